"""The versions the project pins, read from pyproject.toml and requirements.lock."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from k8s_tools import REPO

__all__ = ["project_version", "pyproject_pins", "lock_pins", "base_image", "IMAGE", "MLFLOW_IMAGE"]

IMAGE = "ghcr.io/hpsweep/hpsweep"
MLFLOW_IMAGE = "ghcr.io/hpsweep/mlflow"


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def project_version() -> str:
    return _pyproject()["project"]["version"]


def pyproject_pins() -> dict[str, str]:
    """``name==version`` dependencies of pyproject.toml (extras dropped), by lower-case name."""
    pins = {}
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;]+)\s*", dep)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def lock_pins(path: Path = REPO / "requirements.lock") -> dict[str, str]:
    """Every ``name==version`` of requirements.lock, by lower-case name (local tags kept)."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.split("#")[0].strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def base_image(dockerfile_text: str) -> str:
    """The image a Dockerfile builds FROM by default: ``FROM ${ARG}`` resolved to the ARG's default."""
    ref = re.search(r"^FROM\s+(\S+)", dockerfile_text, re.M).group(1)
    m = re.fullmatch(r"\$\{?(\w+)\}?", ref)
    if m:
        ref = re.search(rf"^ARG\s+{m.group(1)}=(\S+)", dockerfile_text, re.M).group(1)
    return ref
