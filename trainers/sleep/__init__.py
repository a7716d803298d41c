"""A synthetic trainer for orchestration tests and benchmarks: it sleeps instead of training.

Its loss curve is a known function of its parameters (``loss = x**2 + 1/(step+1)`` plus a
seed-dependent wobble), so search algorithms and schedulers can be checked for the right
answer, and ``fail_at`` makes a trial raise to exercise retries. ``starts_dir`` counts starts:
each call of ``train`` appends the step it starts from to a file of its own per cell there
(``x=<x>,seed=<seed>``), so tests can check that a cell ran exactly once across drivers.
"""

from hpsweep.trainer.registry import lazy_exports
from trainers.sleep.config import METRICS, Config

__all__ = ["Config", "train", "METRICS", "InjectedFailure"]

__getattr__ = lazy_exports(__name__, {"train": "training", "InjectedFailure": "training"})
