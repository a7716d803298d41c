"""A user's own code as the tests that ship it need it, outside the checkout: a trainer file that
imports its requirement where it trains, and that requirement, a distribution built into a wheel
here (no package index), holding one constant the trainer reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["trainer_with_requirement", "requirement_wheel"]


def trainer_with_requirement(module: str) -> str:
    """A trainer file's text: no import from hpsweep; ``module`` imported in ``train`` (the
    submitting machine validates the sweep without it), its ``MAGIC`` reported as ``magic``."""
    return f"""\
import dataclasses

METRICS = ("loss", "magic")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    x: float = 0.0


def train(config, run):
    import {module}

    run.report(1, loss=config.x ** 2, magic={module}.MAGIC)
"""


def requirement_wheel(work: Path, into: Path, dist: str, version: str, magic: float) -> Path:
    """Distribution ``dist`` (its module: the name with ``_`` for ``-``) at ``version``, one module
    with ``MAGIC = magic``, built under ``work`` into a wheel in ``into`` by this Python's pip."""
    module = dist.replace("-", "_")
    src = work / f"{dist}-src"
    (src / module).mkdir(parents=True)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{dist}"\nversion = "{version}"\n\n[tool.setuptools]\npackages = ["{module}"]\n')
    (src / module / "__init__.py").write_text(f"MAGIC = {magic}\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(into), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = into.glob(f"{module}-{version}-*.whl")
    return wheel
