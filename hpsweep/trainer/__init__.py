"""The public trainer API: what a trainer may import from hpsweep (none of it is required).

Imports no torch, Ray or MLflow: names are loaded from their submodules on first use."""

from __future__ import annotations

import importlib

__all__ = ["Run", "LocalRun", "DataPath", "OutputName", "seed_everything", "rng_state", "set_rng_state"]

_WHERE = {"Run": "run", "LocalRun": "run", "DataPath": "config", "OutputName": "config",
          "seed_everything": "seeding", "rng_state": "seeding", "set_rng_state": "seeding"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'hpsweep.trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hpsweep.trainer.{_WHERE[name]}"), name)
