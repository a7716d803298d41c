"""hpsweep: run a paper's hyperparameter grid for real, every cell and every seed.

The Python API (:mod:`hpsweep.api`) is exported here lazily, so that ``import hpsweep`` stays
light (no Ray, torch, MLflow or pandas): ``hpsweep.load(path)``, ``hpsweep.sweeps()``,
``hpsweep.Sweep``.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["__version__", "load", "sweeps", "Sweep"]

_API = ("load", "sweeps", "Sweep")


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("hpsweep.api"), name)
    raise AttributeError(f"module 'hpsweep' has no attribute {name!r}")
