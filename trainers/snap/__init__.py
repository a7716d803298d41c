"""SnAp: practical real-time recurrent learning with a sparse approximation (Menick et al., 2021).

Online gradients for sparse GRU/LSTM networks: BPTT, RTRL, SnAp-n and UORO (see
:mod:`trainers.snap.influence`), on the Copy task with a curriculum and byte-level language
modelling (:mod:`trainers.snap.tasks`). ``train(config, run)`` is the trainer;
``sequence_gradient`` computes any method's gradient of a sequence loss. Only ``Config`` and
``METRICS`` are imported with the package (no torch); the rest on first use.
"""

from hpsweep.trainer.registry import lazy_exports
from trainers.snap.config import METRICS, Config

__all__ = ["Config", "METRICS", "SparseRNN", "sequence_gradient", "train"]

__getattr__ = lazy_exports(__name__, {"SparseRNN": "cells", "sequence_gradient": "gradients",
                                      "train": "training"})
