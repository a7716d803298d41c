"""Data access: a local path as it is, or an ``s3://`` URI fetched once to a node-local cache.

Where a location from a sweep file (or the command line) may point: anywhere the user names
explicitly, an absolute path or an ``s3://`` URI; a relative path is looked up under a few
bases (the sweep file's directory, then the data root; standalone, the current directory,
then the data root) and may not climb out of them (``../../etc/passwd`` is refused, as is a
relative path whose ``..`` leaves the base). ``output:NAME`` names a file an earlier run wrote
through ``run.output(NAME)``; the run resolves it. The data root is ``HPSWEEP_DATA_ROOT``
(or ``HPSWEEP_SHARED_DATA``) when set; without it, relative locations resolve under the sweep
file's directory (standalone: the current directory) alone.
:func:`check_location` and :func:`check_output_name` say what is wrong with a value before
anything runs (``hpsweep validate``); :func:`locate` resolves one (``run.data_path``).

In a job that ``hpsweep submit`` sent to a cluster, ``HPSWEEP_SHIPPED_FROM`` names the directory
on the submitting machine whose allowed files are the job's working directory: an absolute path
under it (a command trainer's ``workdir``, a data file the sweep names) means the same path in
the node's own copy of that directory, this process's working directory (:func:`relocate`).

S3 settings come from the standard AWS environment (``AWS_ENDPOINT_URL`` for S3-compatible
stores such as MinIO, credentials from the environment or ``~/.aws``); nothing is hard-coded.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

__all__ = ["fetch", "default_cache_dir", "split_s3", "data_root", "standalone_bases", "locate",
           "check_location", "check_output_name", "output_name", "expand_vars", "OUTPUT_SCHEME",
           "PathEscape", "relocate", "SHIPPED_FROM"]

#: the prefix of a location that names a stored output (``output:models/lstm.pt``)
OUTPUT_SCHEME = "output:"

#: set on a submitted job's nodes: the directory its working directory was shipped from
SHIPPED_FROM = "HPSWEEP_SHIPPED_FROM"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class PathEscape(ValueError):
    """A relative location that climbs out of its bases, or an output name that is a path."""


def data_root() -> Path | None:
    """``HPSWEEP_DATA_ROOT`` (or ``HPSWEEP_SHARED_DATA``), absolute; None when neither is set."""
    given = os.environ.get("HPSWEEP_DATA_ROOT") or os.environ.get("HPSWEEP_SHARED_DATA")
    return Path(os.path.normpath(Path(given).expanduser().absolute())) if given else None


def standalone_bases() -> list[Path]:
    """Where a relative location resolves for a trainer run on its own: here, then the data root."""
    root = data_root()
    return [Path.cwd()] + ([root] if root is not None else [])


def relocate(path: str) -> str:
    """``path`` as this node has it: in a submitted job (``HPSWEEP_SHIPPED_FROM`` set), an
    absolute path under the directory the job was shipped from becomes the same path under the
    job's working directory here (the current one); any other path is returned as it is."""
    origin = os.environ.get(SHIPPED_FROM)
    if not origin or not os.path.isabs(path):
        return path
    norm = os.path.normpath(path)
    for base in {os.path.normpath(origin), os.path.realpath(origin)}:
        if norm == base or norm.startswith(base.rstrip(os.sep) + os.sep):
            return os.path.normpath(os.path.join(os.getcwd(), os.path.relpath(norm, base)))
    return path


def expand_vars(uri: str) -> str:
    """``${VAR}`` / ``${VAR:-default}`` from the environment (an unset one without a default: ValueError)."""
    def sub(match: re.Match) -> str:
        value = os.environ.get(match.group(1))
        if value:
            return value
        if match.group(2) is not None:
            return match.group(2)
        raise ValueError(f"{uri!r}: environment variable {match.group(1)} is not set")

    return _VAR.sub(sub, uri)


def _is_explicit(uri: str) -> bool:
    return "://" in uri or os.path.isabs(uri) or uri.startswith("~")


def check_output_name(name: str) -> str | None:
    """None for a usable output name (``lstm.pt``, ``models/lstm-{seed}.pt``), else the problem."""
    if not isinstance(name, str) or not name.strip("/"):
        return "an output name must not be empty"
    if "://" in name or name.startswith(("/", "~", "\\")) or ":" in name.split("/", 1)[0]:
        return (f"{name!r} is a path or URI; an output is a name (e.g. models/lstm.pt) that the run "
                "stores with the sweep's outputs (read it back as output:NAME)")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if any(p in ("..", ".") for p in parts):
        return f"{name!r}: an output name may not contain '.' or '..' parts; give e.g. models/lstm.pt"
    return None


def output_name(uri: str) -> str | None:
    """``models/lstm.pt`` for ``output:models/lstm.pt`` (checked), None for any other location."""
    if not uri.startswith(OUTPUT_SCHEME):
        return None
    name = uri[len(OUTPUT_SCHEME):]
    problem = check_output_name(name)
    if problem:
        raise PathEscape(problem)
    return name.strip("/")


def _escapes(uri: str) -> bool:
    norm = os.path.normpath(uri)
    return norm == ".." or norm.startswith(".." + os.sep)


def check_location(uri: str, bases: Sequence[Path], must_exist: bool = True) -> str | None:
    """None when ``uri`` is a usable data location, else the problem (with the fix).

    Absolute paths and ``s3://`` URIs are the user's explicit choice; ``output:NAME`` must be a
    proper name; a relative path must stay under its bases and (``must_exist``) exist under one.
    """
    try:
        uri = expand_vars(uri)
    except ValueError as exc:
        return str(exc)
    if uri.startswith(OUTPUT_SCHEME):
        return check_output_name(uri[len(OUTPUT_SCHEME):])
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    uri = relocate(uri)
    if _is_explicit(uri):
        if must_exist and "://" not in uri and not Path(uri).expanduser().exists():
            return f"{uri!r} does not exist; give an existing path or an s3:// URI"
        return None
    shown = ", ".join(str(b) for b in bases)
    if _escapes(uri):
        return (f"{uri!r} climbs out of where relative paths resolve ({shown}); name the data "
                "relative to one of those, or give an absolute path or s3:// URI")
    if must_exist and not any((Path(b) / uri).exists() for b in bases):
        return f"{uri!r} is not under {shown}; give a path that exists there, an absolute path or an s3:// URI"
    return None


def locate(uri: str, bases: Sequence[Path]) -> str:
    """The location to fetch: explicit ones as given, a relative path under the first base that
    has it (never climbing out: :class:`PathEscape`). ``output:`` locations are left to the run."""
    uri = expand_vars(uri)
    if uri.startswith(OUTPUT_SCHEME):
        return uri
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    uri = relocate(uri)
    if _is_explicit(uri):
        return uri
    problem = check_location(uri, bases, must_exist=False)
    if problem:
        raise PathEscape(problem)
    for base in bases:
        candidate = Path(base) / os.path.normpath(uri)
        if candidate.exists():
            return str(candidate.absolute())   # a base relative to the working directory: a job's
    problem = check_location(uri, bases)
    raise FileNotFoundError(problem)


def default_cache_dir() -> Path:
    return Path(os.environ.get("HPSWEEP_DATA_CACHE", Path.home() / ".cache" / "hpsweep" / "data"))


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: an s3:// URI needs a bucket name")
    return bucket, key


def fetch(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Return a local path for ``uri``.

    A local path (or ``file://`` URI) is returned as is, after checking it exists. An
    ``s3://bucket/key`` object is downloaded to ``cache_dir/bucket/key`` unless already there
    with the same size; an ``s3://bucket/prefix/`` (trailing slash) fetches every object under
    the prefix and returns the local directory.
    """
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if not uri.startswith("s3://"):
        path = Path(uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data path {uri!r} does not exist")
        return path
    import boto3  # only needed for s3:// data

    bucket, key = split_s3(uri)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    client = boto3.client("s3")
    if key == "" or key.endswith("/"):
        paginator = client.get_paginator("list_objects_v2")
        found = False
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                found = True
                _download(client, bucket, obj["Key"], obj["Size"], root)
        if not found:
            raise FileNotFoundError(f"no objects under {uri!r}")
        return root / bucket / key
    head = client.head_object(Bucket=bucket, Key=key)
    return _download(client, bucket, key, head["ContentLength"], root)


def _download(client, bucket: str, key: str, size: int, root: Path) -> Path:
    local = root / bucket / key
    if local.exists() and local.stat().st_size == size:
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    # Download to a temporary name, then rename: concurrent trials on one node never see a
    # half-written file.
    fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.")
    os.close(fd)
    try:
        client.download_file(bucket, key, tmp)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return local
