"""``trainer: command``: any program, unmodified, once per cell.

The program (``config.command``) runs in a working directory of the cell's own that shows its
source directory (the sweep file's directory, or ``config.workdir``), gets the cell's values as
``--name value`` (or through ``config.args``), and reports metrics by printing them (patterns
with named groups in ``config.metrics``; by default ``name=value`` / ``name: value`` pairs) or
by appending JSON lines to ``$HPSWEEP_METRICS_FILE``. ``$HPSWEEP_CHECKPOINT_DIR`` is kept as
the cell's checkpoint and restored before a resumed attempt (``HPSWEEP_RESUME=1``). See
``sweeps/README.md`` for the fields. Imports no Ray or MLflow: it is a trainer like any other.
"""

from hpsweep.trainer.command.config import METRICS, Config
from hpsweep.trainer.registry import lazy_exports

__all__ = ["Config", "METRICS", "train", "CommandFailed", "MetricNeverSeen"]

__getattr__ = lazy_exports(__name__, {"train": "training", "CommandFailed": "training",
                                      "MetricNeverSeen": "training"})
