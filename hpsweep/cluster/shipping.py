"""What a submitted job carries to a cluster: an allow-list, never the directory. The packages, the
sweep file, the files it names inside the project, its trainer (a file or a package directory),
a command trainer's directory (``config.workdir``, by default the sweep file's: whole, less
environments, caches and results) and its local requirements (wheels, archives) go; credential
files never do (left out of the packages with a message, refused when the sweep names one or
when one is in a command trainer's directory), and neither does a URL that carries a password or
a token. Every path keeps its place relative to the shipped root; on the nodes an absolute path
under the root means the node's copy (:func:`hpsweep.trainer.data.relocate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hpsweep.errors import CredentialRefused, UsageError

__all__ = ["stage_working_dir", "shipped_with", "command_dirs", "no_credentials", "SHIPPED_PACKAGES",
           "CREDENTIAL_NAMES", "WORKING_DIR_EXCLUDES"]

#: never shipped in a working directory: environments, caches, local results
WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "venv", ".hpsweep", "runs", "mlruns", "mlartifacts",
    "**/__pycache__", "*.pyc", ".pytest_cache", "*.egg-info", "build", "out",
]

#: what a job's working directory holds: these packages, the sweep file, and the files the
#: sweep names inside the project (see ``stage_working_dir``); nothing else
SHIPPED_PACKAGES = ("hpsweep", "trainers")

#: file and directory names that hold credentials: never shipped (stripped from the packages
#: with a message; refused when the sweep itself names one)
CREDENTIAL_NAMES = (
    ".env", ".env.*", "*.env", ".envrc", ".netrc", "_netrc", ".pgpass", ".pypirc", ".npmrc",
    ".git-credentials", ".dockercfg", "credentials", "credentials.*", "secrets", "secrets.*",
    "*secret*", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12",
    "*.pfx", "*.keystore", "*.jks", "auth_token", ".aws", ".ssh", ".gnupg", ".docker", ".kube",
    ".azure", ".config",
)

#: query-string keys that carry a credential (a presigned URL, a token in the URL)
_SECRET_QUERY_KEYS = ("token", "access_token", "auth", "authorization", "password", "passwd",
                      "pwd", "secret", "key", "api_key", "apikey", "sig", "signature",
                      "x-amz-signature", "x-amz-credential", "x-amz-security-token", "sas")


def no_credentials(flag: str, uri: str | None) -> None:
    if uri and urlsplit(uri).password:
        raise UsageError(
            f"{flag} {uri.split('@')[-1]!r} carries a password; give credentials to the cluster "
            "through its environment (Kubernetes Secrets, MLFLOW_TRACKING_PASSWORD), never the job"
        )
    if uri:
        from urllib.parse import parse_qsl

        parts = urlsplit(uri)
        keys = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True)
                if k.lower() in _SECRET_QUERY_KEYS or "token" in k.lower() or "secret" in k.lower()]
        if keys:
            shown = f"{parts.scheme}://{parts.netloc.split('@')[-1]}{parts.path}"
            raise CredentialRefused(
                f"{flag} {shown!r} carries a credential in its query string ({', '.join(keys)}); "
                "give credentials to the cluster through its environment (Kubernetes Secrets, "
                "MLFLOW_TRACKING_TOKEN), never the job"
            )


def _is_credential(name: str) -> bool:
    import fnmatch

    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern) for pattern in CREDENTIAL_NAMES)


def _named_files(spec: Any, root: Path, sweep_dir: Path) -> list[Path]:
    """Files and directories inside ``root`` that the sweep's config or parameter values name
    (relative to the working directory or the sweep file)."""
    values: list[str] = []
    for value in (spec.config or {}).values():
        if isinstance(value, str):
            values.append(value)
    for domain in (spec.parameters or {}).values():
        values.extend(v for v in domain.extremes() if isinstance(v, str))
    found = []
    for value in values:
        if "://" in value or not value.strip():
            continue
        for base in (sweep_dir, root):
            path = (base / value).resolve()
            if path.exists() and path.is_relative_to(root) and path != root:
                found.append(path)
                break
    return found


def _excluded(name: str) -> bool:
    """Whether Ray leaves ``name`` out of the uploaded working directory (``WORKING_DIR_EXCLUDES``,
    which match a name at any depth)."""
    import fnmatch

    return any(fnmatch.fnmatchcase(name, pattern.removeprefix("**/")) for pattern in WORKING_DIR_EXCLUDES)


def _workdirs(spec: Any) -> list[tuple[str, str]]:
    """``(where, value)`` of each ``workdir`` a command sweep gives its cells: the fixed config's
    (by default ``.``, the sweep file's directory), a swept one's values, the variants'."""
    def where(*path) -> str:
        field = ".".join(map(str, path))
        return f"{spec._sources.where(*path)}: {field}" if spec._sources is not None else field

    given = [(where("parameters", "workdir"), spec.parameters.get("workdir"))]
    given += [(where("variants", i, "workdir"), v.get("workdir")) for i, v in enumerate(spec.variants)]
    values = {str(value): (at, str(value)) for at, domain in given if domain is not None
              for value in domain.extremes()}
    every_cell = "workdir" in spec.parameters or (spec.variants and all("workdir" in v for v in spec.variants))
    if not every_cell:   # some cells take the fixed config's, or the default: the sweep file's directory
        at = where("config", "workdir") if "workdir" in spec.config else where("trainer")
        value = str(spec.config.get("workdir") or ".")
        values.setdefault(value, (at, value))
    return list(values.values())


def command_dirs(spec: Any, root: Path) -> list[tuple[str, Path]]:
    """A command trainer's directories (``config.workdir``, by default the sweep file's), each
    as ``(what, path)`` and resolved as a trial resolves it; each must be inside ``root``. Empty
    for any other trainer."""
    from hpsweep.trainer.data import expand_vars, locate

    if spec.trainer_info().module != "hpsweep.trainer.command":
        return []
    bases = [Path(b) for b in spec.data_bases()]
    out = []
    for where, value in _workdirs(spec):
        what = f"{where} {value!r}" + (" (the sweep file's directory)" if value == "." else "")
        try:
            path = Path(locate(expand_vars(value), bases)).resolve()
        except (OSError, ValueError) as exc:
            raise UsageError(f"{what}: {exc}") from None
        if not path.is_dir():
            raise UsageError(f"{what}: {path} is not a directory; give the directory the program runs from")
        if not path.is_relative_to(root.resolve()):
            raise UsageError(f"{what}: {path} is outside the working directory {root} that is shipped to the "
                             "cluster; move it inside, or pass --working-dir a directory that holds both it "
                             "and the sweep file")
        out.append((what, path))
    return out


def _command_dir_contents(what: str, path: Path, root: Path) -> list[str]:
    """Check a command trainer's directory before it is shipped whole: a credential file (or
    directory) in it refuses the job, naming each; returns the symbolic links, which are left out."""
    import os

    found, links = [], []
    for directory, dirs, files in os.walk(path):
        here = Path(directory)
        keep = []
        for name in sorted(dirs):
            full = here / name
            if _excluded(name) or (here == root and name in SHIPPED_PACKAGES):
                continue
            if _is_credential(name):
                found.append(full)
            elif full.is_symlink():
                links.append(str(full.relative_to(root)))
            else:
                keep.append(name)
        dirs[:] = keep
        for name in sorted(files):
            full = here / name
            if _excluded(name):
                continue
            if _is_credential(name):
                found.append(full)
            elif full.is_symlink():
                links.append(str(full.relative_to(root)))
    if found:
        shown = ", ".join(str(f.relative_to(root)) for f in found[:10]) + (" ..." if len(found) > 10 else "")
        raise CredentialRefused(
            f"{what}: {shown}: looks like a credentials file, and submit ships the command's directory "
            f"{path} whole: credentials never travel with a job. Move it out of that directory (or point "
            "config.workdir at a directory that holds only the program and its files), and give the "
            "nodes their credentials through their environment")
    return links


def shipped_with(spec: Any, root: Path) -> list[Path]:
    """What the sweep's own code needs shipped: its trainer's file or package directory and its
    local requirements (wheels, source archives); each must be inside ``root``."""
    from hpsweep.spec.requirements import shipped

    wanted: list[tuple[str, Path]] = []
    ref = spec.trainer_info().ref
    if ref is not None and ref.source is not None:
        wanted.append((f"trainer {ref.text}", Path(ref.source)))
    wanted += [(f"requirement {path.name}", path) for path in shipped(list(spec._requirements))]
    out = []
    for what, path in wanted:
        path = path.resolve()
        if not path.is_relative_to(root.resolve()):
            raise UsageError(f"{what}: {path} is outside the working directory {root} that is shipped "
                             "to the cluster; move it inside, or pass --working-dir")
        out.append(path)
    return out


def stage_working_dir(root: Path, sweep: Path, spec: Any, extra: list[Path] = (),
                      commands: list[tuple[str, Path]] = ()) -> tuple[Path, list[str], list[str]]:
    """Copy what the job needs into a fresh directory: the packages (``SHIPPED_PACKAGES`` found
    in ``root``), the sweep file and what it names inside ``root``, ``extra`` (the trainer
    and local requirements, :func:`shipped_with`) and ``commands`` (a command trainer's
    directories, :func:`command_dirs`: whole, less what Ray leaves out of a working directory
    and the packages), at the same relative paths.

    Credential files are left out of the packages (returned, for a message, with the symbolic
    links left out of the command directories); a sweep file, or a file it names, that looks
    like one is refused, and so is a command directory that holds one.
    """
    import shutil
    import tempfile

    stripped: list[str] = []
    links = [link for what, path in commands for link in _command_dir_contents(what, path, root)]

    def ignore(directory: str, names: list[str]) -> list[str]:
        skip = []
        for name in names:
            full = Path(directory) / name
            if _is_credential(name):
                skip.append(name)
                stripped.append(str(full.relative_to(root)))
            elif name == "__pycache__" or name.endswith((".pyc", ".egg-info")) or full.is_symlink():
                skip.append(name)
        return skip

    wanted = [sweep.resolve(), *_named_files(spec, root, sweep.resolve().parent), *extra]
    for path in wanted:
        relative = path.relative_to(root)
        if any(_is_credential(part) for part in relative.parts):
            raise CredentialRefused(f"{relative}: looks like a credentials file; it is never shipped to a "
                            "cluster (give the nodes their credentials through their environment)")
    stage = Path(tempfile.mkdtemp(prefix="hpsweep-job-"))

    def whole(directory: str, names: list[str]) -> list[str]:
        """A command directory: all but what Ray excludes, the packages, links (and the stage)."""
        here = Path(directory)
        return [name for name in names
                if _excluded(name) or (here == root and name in SHIPPED_PACKAGES)
                or (here / name).is_symlink() or here / name == stage]

    try:
        for package in SHIPPED_PACKAGES:
            if (root / package).is_dir():
                shutil.copytree(root / package, stage / package, ignore=ignore)
        for _, path in commands:
            shutil.copytree(path, stage / path.relative_to(root), ignore=whole, dirs_exist_ok=True)
        for path in wanted:
            target = stage / path.relative_to(root)
            if target.exists():   # in a command directory (copied whole) or the packages
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, target, ignore=ignore)
            else:
                shutil.copy2(path, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage, stripped, links
