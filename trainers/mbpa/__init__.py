"""Memory-based Parameter Adaptation (Sprechmann et al., ICLR 2018).

An episodic memory of (embedding, label) pairs; at prediction time the K nearest neighbours
of a query drive T gradient steps on a per-query copy of the output network, used once and
thrown away. Experiments: permuted MNIST (against EWC and SGD), incremental classes on MNIST,
and a word-level LSTM language model mixed with a neural cache and MbPA.

Layout: ``config.py`` (Config, METRICS; no torch), ``training.py`` (``train``),
``memory.py`` (memory, kNN, kernel weights), ``adapt.py`` (batched local adaptation),
``lm_adapt.py`` (softmax correction, neural cache, mixture),
``data.py`` (MNIST IDX, PTB files), ``models.py``, ``classify.py`` and ``lm.py`` (the loops).
Only ``Config`` and ``METRICS`` are imported with the package; ``train`` on first use.
"""

from hpsweep.trainer.registry import lazy_exports
from trainers.mbpa.config import METRICS, Config

__getattr__ = lazy_exports(__name__, {"train": "training"})

__all__ = ["Config", "train", "METRICS"]
