"""Where checkpoints and Tune's experiment state live: a local directory or ``s3://``.

Both go through a pyarrow filesystem, the same kind Ray Tune uses, so the sweep's own
checkpoints and Tune's state sit side by side under one root:

    <root>/<sweep>/cells/<cell id>/checkpoint.pt    the trainer's latest checkpoint
    <root>/<sweep>/tune/                            Ray Tune's experiment state
    <root>/outputs/<name>                           files trainers write with ``run.output``

Outputs are storage-wide, not per sweep: a stage-2 sweep reads (``output:NAME``) the model
that a stage-1 sweep wrote on the same storage.

Checkpoints are keyed by cell id, not by Tune's trial id, so a cell that died resumes from
its checkpoint in this invocation (a retry) or a later one (a rerun of the spec, even with
seeds added). S3 settings come from the standard AWS environment: credentials from the
environment or ``~/.aws``, ``AWS_ENDPOINT_URL`` (or ``--s3-endpoint``) for MinIO and other
S3-compatible stores. Nothing about credentials is ever logged or written to MLflow.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from hpsweep.errors import StorageUnreachable

__all__ = ["Storage", "open_storage", "DEFAULT_STORAGE"]

DEFAULT_STORAGE = ".hpsweep/storage"


@dataclasses.dataclass
class Storage:
    uri: str                        # what the user gave, for messages
    root: str                       # the path inside ``fs`` (no scheme: what Tune wants)
    fs: pafs.FileSystem
    endpoint: str | None = None     # S3 endpoint override, passed on to workers

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def read_bytes(self, *parts: str) -> bytes | None:
        """The object's bytes, or None if it does not exist."""
        try:
            with self.fs.open_input_stream(self.path(*parts)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError:
            # pyarrow's S3 raises a plain OSError for a missing key: ask whether it exists
            if not self.exists(*parts):
                return None
            raise

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write atomically: readers see the old object or the new one, never half of one."""
        target = self.path(*parts)
        if self.is_s3:  # an S3 PUT replaces the object atomically
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        tmp = f"{target}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, target)

    def put_path(self, local: str | Path, *parts: str) -> None:
        """Copy a local file, or a directory's files, to ``parts`` (each file written atomically)."""
        local = Path(local)
        if local.is_dir():
            for file in sorted(p for p in local.rglob("*") if p.is_file()):
                self.write_bytes(file.read_bytes(), *parts, *file.relative_to(local).parts)
        else:
            self.write_bytes(local.read_bytes(), *parts)

    def local_path(self, *parts: str) -> Path | None:
        """The path of ``parts`` on this node for a local storage (None for S3)."""
        return None if self.is_s3 else Path(self.path(*parts))

    def get_path(self, cache: str | Path, *parts: str) -> Path | None:
        """A local copy of the file or directory at ``parts`` (None if there is none): a local
        storage's own path; from S3, downloaded under ``cache``, each file again only when its
        size or modification time changed (a rerun of the stage that wrote it)."""
        local = self.local_path(*parts)
        if local is not None:
            return local if local.exists() else None
        info = self.fs.get_file_info(self.path(*parts))
        target = Path(cache).joinpath(self.root, *parts)
        if info.type == pafs.FileType.File:
            self._download(info, target)
            return target
        files = [i for i in self.fs.get_file_info(pafs.FileSelector(self.path(*parts), recursive=True,
                                                                     allow_not_found=True))
                 if i.type == pafs.FileType.File]
        if not files:
            return None
        prefix = self.path(*parts).rstrip("/") + "/"
        for i in files:
            self._download(i, target / i.path[len(prefix):])
        return target

    def _download(self, info, target: Path) -> None:
        mtime = info.mtime_ns
        if target.exists() and target.stat().st_size == info.size and (
                mtime is None or target.stat().st_mtime_ns == mtime):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            with self.fs.open_input_stream(info.path) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            if mtime is not None:
                os.utime(tmp, ns=(mtime, mtime))
            os.replace(tmp, target)   # concurrent trials on one node never see half a file
        finally:
            if tmp.exists():
                tmp.unlink()

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def check_reachable(self) -> None:
        """For S3: the bucket answers and exists, else :class:`StorageUnreachable` (before a
        sweep starts). A local directory always does (it is created on open)."""
        if not self.is_s3:
            return
        bucket = self.root.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket)
        except OSError as exc:
            raise StorageUnreachable(
                f"--storage {self.uri}: cannot reach the bucket ({exc}); check AWS_ENDPOINT_URL "
                "and your AWS credentials") from None
        if info.type == pafs.FileType.NotFound:
            raise StorageUnreachable(f"--storage {self.uri}: bucket {bucket!r} does not exist; "
                                     "create it first")

    def spec(self) -> dict:
        """What a worker needs to reopen this storage (no credentials: workers read their own)."""
        return {"uri": self.uri, "endpoint": self.endpoint}


def open_storage(uri: str | None = None, endpoint: str | None = None) -> Storage:
    """Open ``uri`` (default ``.hpsweep/storage``); ``s3://bucket/prefix`` uses pyarrow's S3."""
    uri = uri or os.environ.get("HPSWEEP_STORAGE") or DEFAULT_STORAGE
    if uri.startswith("s3://"):
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict = {}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            if endpoint.startswith("http://"):
                kwargs["scheme"] = "http"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        fs = pafs.S3FileSystem(**kwargs)
        root = uri[len("s3://"):].rstrip("/")
        return Storage(uri=uri, root=root, fs=fs, endpoint=endpoint)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    path = Path(uri).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return Storage(uri=str(path), root=str(path), fs=pafs.LocalFileSystem())
