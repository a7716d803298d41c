"""Cell leases: the records (who runs a cell, until when, how it ended) and the protocol on the
side that runs the cell. The compare-and-set writes that make one winner live with the storage
(:meth:`hpsweep.store.storage.Storage.try_acquire`, ``renew``, ``release``)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpsweep.store.storage import Storage

__all__ = ["Lease", "HeldLease", "LeaseLost", "lease_ttl", "driver_id", "HELD", "DONE", "FAILED", "STOPPED",
           "RELEASED", "ACQUIRABLE"]

#: seconds a lease lives without renewal; ``HPSWEEP_LEASE_TTL`` overrides (tests use a few)
DEFAULT_LEASE_TTL = 30.0
HELD, DONE, FAILED, STOPPED, RELEASED = "held", "done", "failed", "stopped", "released"
#: states a trial may acquire over (besides an expired HELD): the cell is not running and not done
ACQUIRABLE = (FAILED, STOPPED, RELEASED)


def lease_ttl() -> float:
    return float(os.environ.get("HPSWEEP_LEASE_TTL") or DEFAULT_LEASE_TTL)


_DRIVER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def driver_id() -> str:
    """This process's name in lease records: host, pid and a nonce (pids get reused)."""
    return _DRIVER_ID


class LeaseLost(RuntimeError):
    """The lease was taken over (it expired while its holder stalled): stop writing."""


@dataclasses.dataclass(frozen=True)
class Lease:
    """One lease record, as read from or written to the store.

    ``state``: ``held`` while a cell runs (renewed before ``expires``, wall-clock seconds;
    expired means its holder is gone), then ``done`` (the cell has a FINISHED run, named in
    ``info``), ``failed``, ``stopped`` (interrupted or stopped by a scheduler) or
    ``released``. ``holder`` is unique per acquisition (renewal by anyone else is refused);
    ``owner`` is who holds it, for people (the driver's host:pid:nonce); ``version`` is what
    the next conditional write must match (the S3 ETag, or a generation number on disk).
    """

    key: str
    state: str
    holder: str
    owner: str
    expires: float
    info: dict
    version: str = ""
    first: bool = False   # as acquired: the key had no record before (never held by anyone)

    @property
    def live(self) -> bool:
        return self.state == HELD and self.expires > time.time()

    @property
    def acquirable(self) -> bool:
        return self.state in ACQUIRABLE or (self.state == HELD and not self.live)

    def body(self, gen: int) -> bytes:
        return json.dumps({"key": self.key, "state": self.state, "holder": self.holder,
                           "owner": self.owner, "expires": self.expires, "info": self.info,
                           "gen": gen}, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes, version: str = "") -> Lease | None:
        try:
            d = json.loads(data)
            return cls(d["key"], d["state"], d["holder"], d["owner"], float(d["expires"]),
                       dict(d.get("info") or {}), version or str(d.get("gen", 0)))
        except (ValueError, KeyError, TypeError):
            return None  # empty or torn (its writer died mid-write): as if absent


class HeldLease:
    """The per-cell lease protocol, on the side that runs the cell (see ``hpsweep.run.trial``).

    :meth:`acquire` takes the cell's lease (or says who holds it); while held, a daemon thread
    renews it every ``ttl / 3``; a renewal refused means another process took the cell over
    after the lease expired (this one stalled past ``ttl``): :meth:`check` then raises
    :class:`LeaseLost`, so nothing more is written for the cell; a renewal that merely fails
    (network) is retried until the lease would have expired. :meth:`end` stops the renewals
    and records how the cell ended (``done``, ``failed``, ``stopped``).
    """

    def __init__(self, storage: Storage, lease: Lease, ttl: float) -> None:
        self.storage, self.lease, self.ttl = storage, lease, ttl
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="hpsweep-lease", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, storage: Storage, key: str, owner: str, info: dict | None = None,
                ttl: float | None = None, over: tuple[str, ...] = ()) -> tuple[HeldLease | None, Lease | None]:
        """(a held lease, None) when won; (None, the record in the way) when not."""
        ttl = lease_ttl() if ttl is None else ttl
        won, lease = storage.try_acquire(key, owner, ttl, info, over)
        return (cls(storage, lease, ttl), None) if won else (None, lease)

    def _beat(self) -> None:
        last_ok = time.time()
        while not self._stop.wait(self.ttl / 3):
            try:
                renewed = self.storage.renew(self.lease, self.ttl)
            except Exception as exc:  # the store did not answer: retry while the lease lasts
                if time.time() - last_ok > self.ttl:
                    self.lost = f"lease on {self.lease.key} not renewed for {self.ttl:.0f}s: {exc}"
                    return
                continue
            if renewed is None:
                current = self.storage.read_lease(self.lease.key)
                self.lost = (f"lease on {self.lease.key} taken over by "
                             f"{current.owner if current else 'nobody'}")
                return
            self.lease, last_ok = renewed, time.time()

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(self.lost)

    def end(self, state: str, info: dict | None = None) -> bool:
        self._stop.set()
        self._thread.join(timeout=self.ttl)
        if self.lost:
            return False
        return self.storage.release(self.lease, state, info)
