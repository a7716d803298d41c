"""Where checkpoints and Tune's experiment state live: a local directory or ``s3://``.

Both go through a pyarrow filesystem, the same kind Ray Tune uses, so the sweep's own
checkpoints and Tune's state sit side by side under one root:

    <root>/<sweep>/cells/<cell id>/<epoch>.<step>.checkpoint.pt    the trainer's latest checkpoint
    <root>/<sweep>/tune/                            Ray Tune's experiment state
    <root>/outputs/<name>                           files trainers write with ``run.output``

Outputs are storage-wide, not per sweep: a stage-2 sweep reads (``output:NAME``) the model
that a stage-1 sweep wrote on the same storage.

Checkpoints are keyed by cell id, not by Tune's trial id, so a cell that died resumes from
its checkpoint in this invocation (a retry) or a later one (a rerun of the spec, even with
seeds added). S3 settings come from the standard AWS environment: credentials from the
environment or ``~/.aws``, ``AWS_ENDPOINT_URL`` (or ``--s3-endpoint``) for MinIO and other
S3-compatible stores. Nothing about credentials is ever logged or written to MLflow.

Cell leases (exactly once across drivers) live here too, beside the checkpoints:

    <root>/leases/<cell id>.json                    who runs the cell, until when

The root is shared by every sweep that uses the storage, and a cell id is a hash of what the
cell computes, so two sweeps that share cells share their leases. Why this store and not
MLflow: a lease needs compare-and-set (one winner however the requests interleave), and
MLflow's REST API has none (a search then a create is two requests another driver can get
between); the storage is what every driver and every worker of a sweep already shares, and
both kinds offer it: S3 conditional writes (``PutObject`` with ``If-None-Match: *`` creates
only if absent, ``If-Match: <etag>`` replaces only the version read, else 412), and on a
local file system an exclusive ``flock`` around each read-modify-write of the record (the
kernel drops the lock when its process dies, so a killed driver never leaves a stale lock;
exclusive creation alone cannot take over an expired record without an ABA race). See
:mod:`hpsweep.store.leases` for the records and the protocol.

The finished index, so that ``hpsweep status`` of a big sweep need not read every run:

    <root>/finished/<index>/<cell id>               empty: the cell has a FINISHED run

``<index>`` is a random key that a sweep's MLflow experiment names in a tag (with this
storage's URI) when it is created; a trial writes its cell's mark after the run is FINISHED,
and a driver after copying a run in from another sweep. Reading it is one listing (1,000 keys
a request on S3). :mod:`hpsweep.store.runs` decides when the index may be trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
import uuid
from pathlib import Path
from typing import Any

from hpsweep.errors import StorageUnreachable
from hpsweep.store.leases import CARRIED, HELD, RELEASED, HeldLease, Lease, driver_id

__all__ = ["Storage", "open_storage", "DEFAULT_STORAGE"]

DEFAULT_STORAGE = ".hpsweep/storage"


@dataclasses.dataclass
class Storage:
    uri: str                        # what the user gave, for messages
    root: str                       # the path inside ``fs`` (no scheme: what Tune wants)
    _fs: Any = dataclasses.field(default=None, repr=False)  # pyarrow's; a local disk's made on first use
    endpoint: str | None = None     # S3 endpoint override, passed on to workers

    @property
    def fs(self):
        """The pyarrow file system. A local disk's is made when first needed: the reads of
        ``status`` (leases, the finished index) use ``os`` and never import pyarrow (0.15 s)."""
        if self._fs is None:
            import pyarrow.fs as pafs

            self._fs = pafs.LocalFileSystem()
        return self._fs

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

    def delete(self, *parts: str) -> None:
        """Delete the object at ``parts`` (nothing if it is not there)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path(*parts))

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
        import pyarrow.fs as pafs

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
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def check_reachable(self) -> None:
        """For S3: the bucket answers and exists, else :class:`StorageUnreachable` (before a
        sweep starts). A local directory always does (it is created on open)."""
        if not self.is_s3:
            return
        import pyarrow.fs as pafs

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

    # -- leases (see the module docstring) --------------------------------------------------

    def lease_path(self, key: str) -> str:
        return self.path("leases", f"{key}.json")

    def read_lease(self, key: str) -> Lease | None:
        if self.is_s3:
            got = self._s3_get(key)
            return None if got is None else Lease.parse(*got)
        path = self.lease_path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return Lease.parse(_read_all(fd))
        finally:
            os.close(fd)

    def lease_keys(self) -> set[str]:
        """The keys that have a lease record (one listing: cheap next to reading each)."""
        return {n[:-len(".json")] for n in self._names("leases") if n.endswith(".json")}

    def _names(self, *parts: str) -> list[str]:
        """The names of the files directly in folder ``parts`` (none if it does not exist):
        one directory read, or one S3 listing of 1,000 keys a request."""
        if self.is_s3:
            client, bucket = self._s3()
            prefix = self.path(*parts, "").partition("/")[2]
            names: list[str] = []
            for page in client.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=prefix, Delimiter="/"):
                names.extend(o["Key"][len(prefix):] for o in page.get("Contents", []))
            return names
        try:
            return os.listdir(self.path(*parts))
        except FileNotFoundError:
            return []

    # -- the finished index (see the module docstring) --------------------------------------

    def mark_finished(self, index: str, cell_id: str) -> None:
        """Record that cell ``cell_id`` has a FINISHED run in the experiment of ``index``."""
        self.write_bytes(b"", "finished", index, cell_id)

    def finished_marks(self, index: str) -> set[str]:
        """The cells marked finished under ``index``: one listing, however many."""
        return {n for n in self._names("finished", index) if not n.endswith(".tmp")}

    def live_leases(self, keys) -> dict[str, Lease]:
        """key -> its live lease, for those of ``keys`` some runner holds now."""
        present = self.lease_keys()
        out = {}
        for key in keys:
            if key in present:
                lease = self.read_lease(key)
                if lease is not None and lease.live:
                    out[key] = lease
        return out

    def try_acquire(self, key: str, owner: str, ttl: float, info: dict | None = None,
                    over: tuple[str, ...] = ()) -> tuple[bool, Lease | None]:
        """Take the lease on ``key`` if nobody holds it live: absent, expired, or in a state
        of :data:`ACQUIRABLE` (or of ``over``). One winner however calls interleave. Returns
        (won, the record now in the store: ours when won, else what stood in the way)."""
        mine = Lease(key, HELD, uuid.uuid4().hex, owner, time.time() + ttl, dict(info or {}))

        def decide(current: Lease | None) -> Lease | None:
            if current is None or current.acquirable or current.state in over:
                # first: no runner has ever held this key (so none has written anything of it);
                # epoch: the fencing token, one more than the last holder's; the checkpoint
                # pointer (hpsweep.store.checkpoints) passes to the new holder with the cell
                carried = {k: current.info[k] for k in CARRIED if current is not None and k in current.info}
                return dataclasses.replace(mine, expires=time.time() + ttl, first=current is None,
                                           epoch=(current.epoch if current is not None else 0) + 1,
                                           info={**carried, **mine.info})
            return None

        return self._cas(key, decide)

    def renew(self, lease: Lease, ttl: float, info: dict | None = None) -> Lease | None:
        """Extend ``lease`` (and merge ``info`` into it); None when it is no longer ours (taken
        over): its holder must stop."""
        def decide(current: Lease | None) -> Lease | None:
            if current is None or current.holder != lease.holder or current.state != HELD:
                return None
            return dataclasses.replace(current, expires=time.time() + ttl,
                                       info={**current.info, **(info or {})})

        won, now = self._cas(key=lease.key, decide=decide, expected=lease.version)
        return now if won else None

    def release(self, lease: Lease, state: str = RELEASED, info: dict | None = None) -> bool:
        """End ``lease`` in ``state`` (done, failed, stopped, released); False if not ours."""
        def decide(current: Lease | None) -> Lease | None:
            if current is None or current.holder != lease.holder:
                return None
            return dataclasses.replace(current, state=state, expires=time.time(),
                                       info={**current.info, **(info or {})})

        won, _ = self._cas(key=lease.key, decide=decide, expected=lease.version)
        return won

    def release_orphan(self, key: str, owner: str, trial: str) -> bool:
        """Release the lease on ``key`` held for trial ``trial`` of driver ``owner``, whose worker
        died (its driver knows it): the cell is retried now, not after the TTL. Fenced like a
        takeover: should the worker live on after all, nothing it writes reaches the cell."""
        def decide(current: Lease | None) -> Lease | None:
            if current is None or current.state != HELD or current.owner != owner \
                    or current.info.get("trial") != trial:
                return None
            return dataclasses.replace(current, state=RELEASED, expires=time.time(),
                                       info={**current.info, "released": "worker died"})

        won, _ = self._cas(key, decide)
        return won

    def _cas(self, key: str, decide, expected: str | None = None) -> tuple[bool, Lease | None]:
        """Read the record, ask ``decide`` for the new one (None: leave it), write it only if
        the record is still the one read. ``expected``: the version the caller last wrote;
        on S3 the write is conditional on it directly (no read needed when it matches)."""
        if self.is_s3:
            return self._s3_cas(key, decide, expected)
        path = self.lease_path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = Lease.parse(_read_all(fd))
            new = decide(current)
            if new is None:
                return False, current
            gen = int(current.version) + 1 if current is not None and current.version.isdigit() else 1
            new = dataclasses.replace(new, version=str(gen))
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, new.body(gen))
            return True, new
        finally:
            os.close(fd)  # drops the flock

    # S3: the bucket and key of a lease, a boto3 client (pyarrow's S3 has no conditional writes)
    def _s3(self):
        client = getattr(self, "_s3_client", None)
        if client is None:
            import boto3
            from botocore.config import Config

            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            client = boto3.client("s3", endpoint_url=self.endpoint or None, region_name=region,
                                  config=Config(retries={"max_attempts": 3, "mode": "standard"}))
            self._s3_client = client
        bucket, _, prefix = self.root.partition("/")
        return client, bucket

    def _s3_key(self, key: str) -> str:
        return self.lease_path(key).partition("/")[2]

    def _s3_get(self, key: str) -> tuple[bytes, str] | None:
        client, bucket = self._s3()
        try:
            got = client.get_object(Bucket=bucket, Key=self._s3_key(key))
        except client.exceptions.NoSuchKey:
            return None
        return got["Body"].read(), got["ETag"]

    def _s3_cas(self, key: str, decide, expected: str | None) -> tuple[bool, Lease | None]:
        from botocore.exceptions import ClientError

        client, bucket = self._s3()
        got = self._s3_get(key)
        current = None if got is None else Lease.parse(*got)  # unparsable: as if absent
        new = decide(current)
        if new is None:
            return False, current
        if expected is not None and (got is None or got[1] != expected):
            return False, current  # someone else wrote since our last write
        gen = int(time.time() * 1e6)  # the body differs each write, and so does its ETag
        body = new.body(gen)
        cond = {"IfNoneMatch": "*"} if got is None else {"IfMatch": got[1]}
        try:
            put = client.put_object(Bucket=bucket, Key=self._s3_key(key), Body=body,
                                    ContentType="application/json", **cond)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") \
                    or status in (409, 412):
                again = self._s3_get(key)
                return False, None if again is None else Lease.parse(*again)
            raise
        return True, dataclasses.replace(new, version=put["ETag"])

    @contextlib.contextmanager
    def lock(self, key: str, timeout: float = 300.0):
        """A short mutual exclusion between drivers (e.g. creating a sweep's parent run),
        made of a lease renewed while held (a slow holder keeps it); waits for it, releases
        it on exit; a dead holder's expires."""
        deadline = time.time() + timeout
        while True:
            held, other = HeldLease.acquire(self, f"locks/{key}", driver_id())
            if held is not None:
                break
            if time.time() > deadline:
                raise TimeoutError(f"lock {key!r} held by {other.owner if other else '?'}")
            time.sleep(0.05 + 0.1 * (uuid.uuid4().int % 10) / 10)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                held.end(RELEASED)

    def spec(self) -> dict:
        """What a worker needs to reopen this storage (no credentials: workers read their own)."""
        return {"uri": self.uri, "endpoint": self.endpoint}


def open_storage(uri: str | None = None, endpoint: str | None = None) -> Storage:
    """Open ``uri`` (default ``.hpsweep/storage``); ``s3://bucket/prefix`` uses pyarrow's S3."""
    uri = uri or os.environ.get("HPSWEEP_STORAGE") or DEFAULT_STORAGE
    if uri.startswith("s3://"):
        import pyarrow.fs as pafs

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
        return Storage(uri=uri, root=root, _fs=fs, endpoint=endpoint)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    path = Path(uri).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return Storage(uri=str(path), root=str(path))


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
