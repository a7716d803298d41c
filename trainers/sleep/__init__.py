"""A synthetic trainer for orchestration tests and benchmarks: it sleeps instead of training.

Its loss curve is a known function of its parameters (``loss = x**2 + 1/(step+1)`` plus a
seed-dependent wobble), so search algorithms and schedulers can be checked for the right
answer, and ``fail_at`` makes a trial raise to exercise retries.
"""

from __future__ import annotations

import dataclasses
import time

__all__ = ["Config", "train", "METRICS"]

METRICS = ("loss", "score", "extra/*")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    x: float = 0.0               # the "hyperparameter": loss is smallest at x = 0
    reports: int = 5             # number of run.report calls
    sleep: float = 0.2           # seconds slept before each report
    extra_metrics: int = 0       # additional metrics a report carries (extra/0 ...)
    fail_at: int = -1            # raise at this report (>= 0), to test retries

    def __post_init__(self) -> None:
        if self.reports < 1:
            raise ValueError(f"reports must be >= 1, got reports={self.reports}")
        if self.sleep < 0:
            raise ValueError(f"sleep must be >= 0, got sleep={self.sleep}")


class InjectedFailure(RuntimeError):
    """Raised on purpose by ``fail_at``."""


def train(config: Config, run) -> None:
    state = run.load_checkpoint() or {"step": 0}
    wobble = ((config.seed * 7919) % 100) / 1000.0
    for step in range(state["step"], config.reports):
        if step == config.fail_at:
            raise InjectedFailure(f"fail_at={config.fail_at}: failing on purpose at report {step}")
        time.sleep(config.sleep)
        loss = config.x ** 2 + 1.0 / (step + 1) + wobble
        extra = {f"extra/{i}": loss * i for i in range(config.extra_metrics)}
        run.save_checkpoint({"step": step + 1})
        run.report(step + 1, loss=loss, score=-loss, **extra)
