"""Trainers: plain PyTorch programs that know nothing of Ray or MLflow.

Each trainer is a package exposing

- ``Config``: a frozen dataclass; its defaults are the paper's values; ``seed: int`` is a field;
- ``train(config, run)``: the one training loop, reporting through ``run`` (see
  :class:`trainers.common.run.Run`);
- ``METRICS``: the metric names ``train`` may report (``fnmatch`` patterns allowed, such as
  ``"acc/task_*"``), so that a sweep naming a metric the trainer never reports is refused
  before anything is launched.

The registry below is an explicit dictionary: a failed lookup lists what exists.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["TRAINERS", "TrainerInfo", "UnknownTrainer", "load_trainer"]

#: name -> importable module path
TRAINERS: dict[str, str] = {
    "snap": "trainers.snap",
    "mbpa": "trainers.mbpa",
    "sleep": "trainers.sleep",
}


class UnknownTrainer(KeyError):
    """Raised for a trainer name that is not in :data:`TRAINERS`."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class TrainerInfo:
    name: str
    module: str
    Config: type
    train: Callable[[Any, Any], None]
    metrics: tuple[str, ...]

    def reports(self, metric: str) -> bool:
        """True when ``metric`` is one of the names (or patterns) the trainer declares."""
        return any(fnmatch.fnmatchcase(metric, pattern) for pattern in self.metrics)


def load_trainer(name: str) -> TrainerInfo:
    """Import a registered trainer; unknown names fail with the list of valid ones."""
    try:
        module_path = TRAINERS[name]
    except KeyError:
        raise UnknownTrainer(
            f"unknown trainer {name!r}; registered trainers: {', '.join(sorted(TRAINERS))}"
        ) from None
    module = importlib.import_module(module_path)
    return TrainerInfo(
        name=name,
        module=module_path,
        Config=module.Config,
        train=module.train,
        metrics=tuple(module.METRICS),
    )
