"""A sweep's ``requirements:``: the Python packages its trainer needs beyond hpsweep's own.

Either a list (``[scikit-learn>=1.4, ./wheels/mylib-0.1-py3-none-any.whl]``) or the path of a
requirements file, relative to the sweep file. Checked on load (each entry a requirement pip
understands, a local file that exists); a local ``run`` checks that each is installed here and
names the missing ones (:func:`missing`); ``submit`` hands them to Ray's runtime environment,
which installs them on every node the job uses (:func:`runtime_env`): local wheels as
``py_modules`` (Ray uploads each and installs it with ``pip install --target``: seconds), the
rest as ``pip`` (Ray makes a virtualenv per node first, a clone of the nodes' Python
environment: minutes where that environment is large).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

__all__ = ["Requirement", "parse", "missing", "runtime_env", "shipped", "WORKING_DIR_VAR"]

#: set by Ray's runtime-env agent, while it installs a job's pip packages, to the node's copy of
#: the job's working directory (pip expands ``${VAR}`` in requirements files)
WORKING_DIR_VAR = "RAY_RUNTIME_ENV_CREATE_WORKING_DIR"

_ARCHIVES = (".whl", ".tar.gz", ".zip", ".tgz")


@dataclasses.dataclass(frozen=True)
class Requirement:
    text: str                  # as written
    path: Path | None = None   # a local wheel or archive (absolute), else None


def _is_local(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith(_ARCHIVES) and "://" not in text


def _entries(value, base: Path) -> tuple[list[str], list[str]]:
    """The requirement lines of ``value`` (a list, or a requirements file's path), and problems."""
    if value is None:
        return [], []
    if isinstance(value, str):
        path = (base / value).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            return [], [f"{value}: cannot read the requirements file ({exc.strerror or exc})"]
        lines = [line.split(" #")[0].strip() for line in text.splitlines()]
        options = [line for line in lines if line.startswith("-")]
        problems = [f"{value}: {line!r}: pip options are not supported here; list the packages"
                    for line in options]
        return [line for line in lines if line and not line.startswith(("#", "-"))], problems
    return [str(v).strip() for v in value], []


def parse(value, base: Path) -> tuple[list[Requirement], list[str]]:
    """The requirements of ``value`` (the sweep's ``requirements:``; relative paths from
    ``base``, the sweep file's directory), and a message for each problem."""
    from packaging.requirements import InvalidRequirement
    from packaging.requirements import Requirement as Pep508

    texts, problems = _entries(value, base)
    out: list[Requirement] = []
    for text in texts:
        if not text:
            problems.append("an empty requirement")
        elif _is_local(text):
            path = (base / text).expanduser().absolute()
            if not path.is_file():
                problems.append(f"{text}: no such file (relative to {base})")
            else:
                out.append(Requirement(text, path))
        else:
            try:
                Pep508(text)
            except InvalidRequirement as exc:
                problems.append(f"{text!r} is not a requirement pip understands: {str(exc).splitlines()[0]}")
            else:
                out.append(Requirement(text))
    return out, problems


def _name_version(req: Requirement) -> tuple[str, str | None, object]:
    """(distribution name, exact version or None, specifier or None)."""
    from packaging.requirements import Requirement as Pep508
    from packaging.utils import parse_sdist_filename, parse_wheel_filename

    if req.path is not None:
        try:
            if req.path.name.endswith(".whl"):
                name, version, *_ = parse_wheel_filename(req.path.name)
            else:
                name, version = parse_sdist_filename(req.path.name)
            return str(name), str(version), None
        except ValueError:
            return req.path.name, None, None
    parsed = Pep508(req.text)
    if parsed.marker is not None and not parsed.marker.evaluate():
        return "", None, None  # not for this platform
    return parsed.name, None, parsed.specifier


def missing(requirements: list[Requirement]) -> list[str]:
    """Each requirement not installed in this environment, as a person reads it."""
    from importlib import metadata

    from packaging.version import InvalidVersion, Version

    out = []
    for req in requirements:
        name, exact, specifier = _name_version(req)
        if not name:
            continue
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(f"{req.text} (not installed)")
            continue
        try:
            if exact is not None and Version(have) != Version(exact):
                out.append(f"{req.text} ({name} {have} is installed)")
            elif specifier is not None and not specifier.contains(have, prereleases=True):
                out.append(f"{req.text} ({name} {have} is installed)")
        except InvalidVersion:
            continue
    return out


def shipped(requirements: list[Requirement]) -> list[Path]:
    """The local files a job's working directory carries (the job's driver checks the sweep
    file, and its requirements, again; pip builds a source archive from there)."""
    return [r.path for r in requirements if r.path is not None]


def runtime_env(requirements: list[Requirement], root: Path, staged: Path) -> dict[str, list[str]]:
    """The ``py_modules`` (local wheels: their copies in ``staged``, the job's working directory
    as it is uploaded) and ``pip`` (the others; a source archive as its path in the node's copy
    of the working directory, ``root`` on this machine) of a job."""
    wheels, pip = [], []
    for req in requirements:
        if req.path is None:
            pip.append(req.text)
        elif req.path.suffix == ".whl":
            wheels.append(str(staged / req.path.resolve().relative_to(root.resolve())))
        else:
            relative = req.path.resolve().relative_to(root.resolve()).as_posix()
            pip.append(f"${{{WORKING_DIR_VAR}}}/{relative}")
    return {k: v for k, v in (("py_modules", wheels), ("pip", pip)) if v}
