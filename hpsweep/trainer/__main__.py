"""Run any trainer alone, without Ray or MLflow: ``python -m hpsweep.trainer TRAINER key=value ...
[--out DIR]``, where TRAINER is what a sweep's ``trainer:`` takes (``./logreg.py``, ``./mylab/``,
``mylab.logreg``, a registered name); relative paths from the current directory. Metrics go to
``OUT/metrics.jsonl``, the checkpoint to ``OUT/checkpoint.pt``; the same command again resumes
(see :mod:`hpsweep.trainer.cli`)."""

from __future__ import annotations

import sys

from hpsweep.trainer.cli import main
from hpsweep.trainer.registry import TrainerError, load_trainer


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    ref, rest = argv[0], argv[1:]
    try:
        info = load_trainer(ref)
    except TrainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # its training code's own imports
        print(f"error: {type(exc).__name__}: {exc} (importing the training code of {ref})", file=sys.stderr)
        return 2
    return main(ref, info.Config, info.train, rest, prog=f"python -m hpsweep.trainer {ref}")


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1:]))
