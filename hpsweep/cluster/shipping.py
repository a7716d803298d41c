"""What a submitted job carries to a cluster: an allow-list, never the directory. The packages, the
sweep file, the files it names inside the project, its trainer (a file or a package directory)
and its local requirements (wheels, archives) go; credential files never do
(left out of the packages with a message, refused when the sweep names one), and neither does a
URL that carries a password or a token."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hpsweep.errors import CredentialRefused, UsageError

__all__ = ["stage_working_dir", "shipped_with", "no_credentials", "SHIPPED_PACKAGES", "CREDENTIAL_NAMES",
           "WORKING_DIR_EXCLUDES"]

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


def stage_working_dir(root: Path, sweep: Path, spec: Any, extra: list[Path] = ()) -> tuple[Path, list[str]]:
    """Copy what the job needs into a fresh directory: the packages (``SHIPPED_PACKAGES`` found
    in ``root``), the sweep file and what it names inside ``root``, and ``extra`` (the trainer
    and local requirements, :func:`shipped_with`), at the same relative paths.

    Credential files are left out of the packages (returned, for a message); a sweep file, or a
    file it names, that looks like one is refused.
    """
    import shutil
    import tempfile

    stripped: list[str] = []

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
    try:
        for package in SHIPPED_PACKAGES:
            if (root / package).is_dir():
                shutil.copytree(root / package, stage / package, ignore=ignore)
        for path in wanted:
            target = stage / path.relative_to(root)
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, target, ignore=ignore)
            else:
                shutil.copy2(path, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage, stripped
