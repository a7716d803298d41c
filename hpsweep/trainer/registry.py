"""Trainers: plain PyTorch programs that know nothing of Ray or MLflow.

Each trainer is a package ``trainers/<name>/`` with

- ``config.py``: ``Config``, a frozen dataclass (its defaults are the paper's values;
  ``seed: int`` is a field), and ``METRICS``, the metric names ``train`` may report
  (``fnmatch`` patterns allowed, such as ``"acc/task_*"``), so that a sweep naming a metric
  the trainer never reports is refused before anything is launched. This module imports no
  torch: validating a sweep imports only it (:func:`load_config`).
- ``training.py``: ``train(config, run)``, the one training loop, reporting through ``run``
  (see :class:`hpsweep.trainer.run.Run`); :func:`load_trainer` imports it.

A package's ``__init__`` exports these lazily, so that importing ``trainers.snap.config``
does not import the numeric stack. The registry below is an explicit dictionary: a failed
lookup lists what exists.

A trainer whose options or metrics depend on the sweep (the command trainer: any name is a
value for its program, and its metrics are its patterns' names) adds to its config module:

- ``config_class(config) -> type``: the Config for a sweep or cell whose config has these keys;
- ``metrics_of(config) -> tuple[str, ...]``: the metrics a sweep with this fixed config reports;
- ``problems(config, bases) -> [(field, message)]``: checks that need the sweep file's directory
  (``bases``: where relative paths resolve), run by ``hpsweep validate``.

:func:`load_config` and :func:`load_trainer` given the sweep's (or the cell's) config apply them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["TRAINERS", "ConfigInfo", "TrainerInfo", "UnknownTrainer", "load_config", "load_trainer",
           "lazy_exports"]

#: name -> importable package path
TRAINERS: dict[str, str] = {
    "snap": "trainers.snap",
    "mbpa": "trainers.mbpa",
    "sleep": "trainers.sleep",
    "command": "hpsweep.trainer.command",
}


class UnknownTrainer(KeyError):
    """Raised for a trainer name that is not in :data:`TRAINERS`."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class ConfigInfo:
    """What validating a sweep needs of a trainer: its Config and its metrics (no torch)."""
    name: str
    module: str
    Config: type
    metrics: tuple[str, ...]
    #: ``problems(config, bases)`` of the trainer's config module, or None
    check: Callable[[Mapping[str, Any], list], list] | None = None

    def reports(self, metric: str) -> bool:
        """True when ``metric`` is one of the names (or patterns) the trainer declares."""
        return any(fnmatch.fnmatchcase(metric, pattern) for pattern in self.metrics)


@dataclasses.dataclass(frozen=True)
class TrainerInfo(ConfigInfo):
    """A trainer ready to run: its config module and its training loop."""
    train: Callable[[Any, Any], None] = None  # type: ignore[assignment]


def _package(name: str) -> str:
    try:
        return TRAINERS[name]
    except KeyError:
        raise UnknownTrainer(
            f"unknown trainer {name!r}; registered trainers: {', '.join(sorted(TRAINERS))}"
        ) from None


def load_config(name: str, config: Mapping[str, Any] | None = None) -> ConfigInfo:
    """A trainer's Config and METRICS, from ``trainers.<name>.config`` alone (no torch); for a
    sweep's or a cell's ``config`` (its keys, and its fixed values), through the hooks above."""
    package = _package(name)
    module = importlib.import_module(f"{package}.config")
    config_cls, metrics = module.Config, tuple(module.METRICS)
    if config is not None:
        if hasattr(module, "config_class"):
            config_cls = module.config_class(config)
        if hasattr(module, "metrics_of"):
            metrics = tuple(module.metrics_of(config))
    return ConfigInfo(name=name, module=package, Config=config_cls, metrics=metrics,
                      check=getattr(module, "problems", None))


def load_trainer(name: str, config: Mapping[str, Any] | None = None) -> TrainerInfo:
    """Import a registered trainer (its training loop too); unknown names list the valid ones."""
    info = load_config(name, config)
    module = importlib.import_module(f"{info.module}.training")
    return TrainerInfo(name=name, module=info.module, Config=info.Config, metrics=info.metrics,
                       check=info.check, train=module.train)


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` for a trainer package: ``exports`` maps a name to the submodule
    that defines it, imported on first access (PEP 562)."""
    def __getattr__(attr: str):
        if attr not in exports:
            raise AttributeError(f"module {package!r} has no attribute {attr!r}")
        return getattr(importlib.import_module(f"{package}.{exports[attr]}"), attr)
    return __getattr__
