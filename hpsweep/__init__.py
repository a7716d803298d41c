"""hpsweep: run a paper's hyperparameter grid for real, every cell and every seed."""

__version__ = "0.1.0"
__all__ = ["__version__"]
