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

__all__ = ["CARRIED", "Lease", "HeldLease", "LeaseLost", "lease_ttl", "driver_id", "HELD", "DONE", "FAILED", "STOPPED",
           "RELEASED", "ACQUIRABLE"]

#: seconds a lease lives without renewal; ``HPSWEEP_LEASE_TTL`` overrides (tests use a few)
DEFAULT_LEASE_TTL = 30.0
HELD, DONE, FAILED, STOPPED, RELEASED = "held", "done", "failed", "stopped", "released"
#: what a lease record's ``info`` passes from one holder to the next: the checkpoint pointer
CARRIED = ("checkpoint",)
#: states a trial may acquire over (besides an expired HELD): the cell is not running and not done
ACQUIRABLE = (FAILED, STOPPED, RELEASED)


def lease_ttl() -> float:
    return float(os.environ.get("HPSWEEP_LEASE_TTL") or DEFAULT_LEASE_TTL)


_DRIVER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def driver_id() -> str:
    """This process's name in lease records: host, pid and a nonce (pids get reused)."""
    return _DRIVER_ID


class LeaseLost(RuntimeError):
    """The lease was taken over (it expired while its holder stalled): stop writing. ``owner``:
    who holds the cell now (a driver's host:pid:nonce), when known."""

    def __init__(self, message: str = "", owner: str = "") -> None:
        super().__init__(message, owner)
        self.message, self.owner = message, owner

    def __str__(self) -> str:
        return self.message


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
    epoch: int = 0        # the fencing token: one more at each acquisition of the key

    @property
    def live(self) -> bool:
        return self.state == HELD and self.expires > time.time()

    @property
    def acquirable(self) -> bool:
        return self.state in ACQUIRABLE or (self.state == HELD and not self.live)

    def body(self, gen: int) -> bytes:
        return json.dumps({"key": self.key, "state": self.state, "holder": self.holder,
                           "owner": self.owner, "expires": self.expires, "info": self.info,
                           "gen": gen, "epoch": self.epoch}, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes, version: str = "") -> Lease | None:
        try:
            d = json.loads(data)
            return cls(d["key"], d["state"], d["holder"], d["owner"], float(d["expires"]),
                       dict(d.get("info") or {}), version or str(d.get("gen", 0)),
                       epoch=int(d.get("epoch", 0)))
        except (ValueError, KeyError, TypeError):
            return None  # empty or torn (its writer died mid-write): as if absent


class HeldLease:
    """The per-cell lease protocol, on the side that runs the cell (see ``hpsweep.run.trial``).

    :meth:`acquire` takes the cell's lease (or says who holds it); while held, a daemon thread
    renews it every ``ttl / 3``. Every write to the record (a renewal, :meth:`publish`,
    :meth:`confirm`, :meth:`end`) is a compare-and-set on the version this holder last wrote,
    so none of them lands once another process has taken the cell over, however long this one
    stalled between deciding and writing: that is the fence. :meth:`check` is the cheap guard a
    trial calls before each report: it raises :class:`LeaseLost` once a renewal was refused,
    and when the lease has expired by the clock (the heartbeat may lag after a pause) it asks
    the store at once (:meth:`confirm`) instead of trusting the flag. A renewal that merely
    fails (network) is retried until the lease would have expired. The stale writes a check
    cannot stop (a pause between a check and the write) are fenced where they land: the
    checkpoint pointer moves only by :meth:`publish`, and a successor deletes its
    predecessor's MLflow run, which the tracking server then refuses to write
    (:mod:`hpsweep.store.tracker`). :meth:`end` stops the renewals and records how the cell
    ended (``done``, ``failed``, ``stopped``).
    """

    def __init__(self, storage: Storage, lease: Lease, ttl: float) -> None:
        self.storage, self.lease, self.ttl = storage, lease, ttl
        self.lost: str | None = None
        self.lost_to = ""                    # who took it over, when known
        self._write = threading.Lock()       # one compare-and-set of ours at a time
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

    @property
    def epoch(self) -> int:
        return self.lease.epoch

    def _update(self, info: dict | None = None) -> bool:
        """Renew (and merge ``info`` into the record) if the lease is still ours: one
        compare-and-set. False, with :attr:`lost` set, when another holder took it over."""
        with self._write:
            if self.lost:
                return False
            renewed = self.storage.renew(self.lease, self.ttl, info)
            if renewed is None:
                current = self.storage.read_lease(self.lease.key)
                self.lost_to = current.owner if current is not None and current.holder != self.lease.holder else ""
                self.lost = f"lease on {self.lease.key} taken over by {self.lost_to or 'nobody'}"
                return False
            self.lease = renewed
            return True

    def _beat(self) -> None:
        last_ok = time.time()
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self._update():
                    return
            except Exception as exc:  # the store did not answer: retry while the lease lasts
                if time.time() - last_ok > self.ttl:
                    with self._write:
                        self.lost = self.lost or f"lease on {self.lease.key} not renewed for {self.ttl:.0f}s: {exc}"
                    return
                continue
            last_ok = time.time()

    def _raise(self) -> None:
        raise LeaseLost(self.lost or f"lease on {self.lease.key} lost", self.lost_to)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease is known lost, or if it expired by the clock
        and the store does not renew it now."""
        if self.lost:
            self._raise()
        if time.time() > self.lease.expires:
            self.confirm()

    def confirm(self) -> None:
        """Renew now, synchronously; :class:`LeaseLost` if the lease is no longer ours (or the
        store cannot say so: the lease cannot be trusted then)."""
        try:
            ok = self._update()
        except Exception as exc:
            if time.time() <= self.lease.expires:
                return   # the store is slow; the lease still stands by the clock
            with self._write:
                self.lost = self.lost or f"lease on {self.lease.key} expired unconfirmed: {exc}"
            ok = False
        if not ok:
            self._raise()

    def publish(self, info: dict) -> None:
        """Merge ``info`` into the lease record (the cell's checkpoint pointer), only while the
        lease is ours: :class:`LeaseLost` otherwise, and the record is unchanged."""
        if not self._update(info):
            self._raise()

    def end(self, state: str, info: dict | None = None) -> bool:
        self._stop.set()
        self._thread.join(timeout=self.ttl)
        with self._write:
            if self.lost:
                return False
            return self.storage.release(self.lease, state, info)
