"""Data access: a local path as it is, or an ``s3://`` URI fetched once to a node-local cache.

S3 settings come from the standard AWS environment (``AWS_ENDPOINT_URL`` for S3-compatible
stores such as MinIO, credentials from the environment or ``~/.aws``); nothing is hard-coded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["fetch", "default_cache_dir", "split_s3"]


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
