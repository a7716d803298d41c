"""SnAp: practical real-time recurrent learning with a sparse approximation (Menick et al., 2021).

Online gradients for sparse GRU/LSTM networks: BPTT, RTRL, SnAp-n and UORO (see
:mod:`trainers.snap.influence`), on the Copy task with a curriculum and byte-level language
modelling (:mod:`trainers.snap.tasks`). ``train(config, run)`` is the trainer;
``sequence_gradient`` computes any method's gradient of a sequence loss.
"""

from trainers.snap.cells import SparseRNN
from trainers.snap.config import METRICS, Config
from trainers.snap.gradients import sequence_gradient
from trainers.snap.train import train

__all__ = ["Config", "METRICS", "SparseRNN", "sequence_gradient", "train"]
