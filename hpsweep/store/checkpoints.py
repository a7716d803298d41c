"""A cell's checkpoint in the storage, fenced by the cell's lease.

Each checkpoint is written to a key of its own attempt, never overwritten::

    <root>/<sweep>/cells/<cell id>/<epoch>.<step>.checkpoint.pt

(``epoch``: the lease's fencing token, one more at each acquisition of the cell), and becomes
the cell's checkpoint only when its holder *publishes* it: a compare-and-set of the cell's lease
record (:meth:`hpsweep.store.leases.HeldLease.publish`) that sets the record's pointer
``info.checkpoint`` (the key, the step of the report it went with, the MLflow run that holds the
history up to that step). The compare-and-set lands only while the writer still holds the lease,
on S3 (``If-Match``) and on a local disk (``flock``) alike, so a holder that stalled past its lease
and was taken over writes, at worst, an object of its own epoch's that no pointer names (and it
deletes it when its publish is refused). The pointer passes to the next holder with the lease
(:data:`hpsweep.store.leases.CARRIED`), so it never goes back: only the holder moves it, forward.
When a new checkpoint is published the one it replaces is deleted, so a cell keeps one.
"""

from __future__ import annotations

import contextlib
import time

from hpsweep.store.leases import HeldLease, LeaseLost
from hpsweep.store.storage import Storage

__all__ = ["CellCheckpoint", "stored_checkpoint"]

SUFFIX = "checkpoint.pt"


def _pointer(info: dict, sweep: str, experiment_id: str) -> dict | None:
    p = info.get("checkpoint")
    if not isinstance(p, dict) or p.get("sweep") != sweep or p.get("experiment_id") != experiment_id:
        return None  # none, or another sweep's (a cell shared by two sweeps has one lease)
    if not isinstance(p.get("key"), str) or not isinstance(p.get("step"), int):
        return None
    return p


def stored_checkpoint(storage: Storage, sweep: str, cell_id: str) -> tuple[bytes, dict] | None:
    """The cell's published checkpoint (bytes, pointer), whichever experiment wrote it: what a
    person (or a test) reads back; None if it has none."""
    lease = storage.read_lease(cell_id)
    p = lease.info.get("checkpoint") if lease is not None else None
    if not isinstance(p, dict) or p.get("sweep") != sweep:
        return None
    data = storage.read_bytes(sweep, "cells", cell_id, p["key"])
    return None if data is None else (data, p)


class CellCheckpoint:
    """The checkpoint of one cell for the attempt holding ``held``: the one to resume from (as
    the lease record named it when this attempt acquired it) and the publishing of new ones."""

    def __init__(self, storage: Storage, sweep: str, experiment_id: str, cell_id: str,
                 held: HeldLease) -> None:
        self.storage, self.sweep, self.experiment_id, self.cell_id = storage, sweep, experiment_id, cell_id
        self.held = held
        # the pointer as acquired: nobody else can move it while this attempt holds the lease
        self.resume_from = _pointer(held.lease.info, sweep, experiment_id)
        self._current = self.resume_from["key"] if self.resume_from else None
        self._unsure: set[str] = set()   # written, their publish failed without an answer

    def discard(self) -> None:
        """The cell was lost: delete the objects this attempt wrote whose publish went
        unanswered, unless the lease record names one (it landed before the takeover: the
        next holder resumes from it)."""
        if not self._unsure:
            return
        with contextlib.suppress(Exception):
            lease = self.storage.read_lease(self.cell_id)
            named = (lease.info.get("checkpoint") or {}).get("key") if lease is not None else None
            for key in sorted(self._unsure - {named}):
                self.storage.delete(self.sweep, "cells", self.cell_id, key)
            self._unsure.clear()

    def read(self) -> bytes | None:
        """The bytes of the checkpoint to resume from (None: a fresh start)."""
        if self.resume_from is None:
            return None
        return self.storage.read_bytes(self.sweep, "cells", self.cell_id, self.resume_from["key"])

    def checked(self, device=None, label: str = "") -> tuple[tuple[bytes, dict] | None, str]:
        """The checkpoint to resume from, read and checked now: ((bytes, pointer) or None, a
        warning). An unreadable one (:class:`CorruptCheckpoint`) is set aside under a name of
        its own and the cell starts again from scratch, with a warning naming the file; an
        unsafe one (:class:`UnsafeCheckpoint`) is raised: it stays refused."""
        from hpsweep.trainer.checkpoint import CorruptCheckpoint, load_state

        if self.resume_from is None:
            return None, ""
        where = self.storage.path(self.sweep, "cells", self.cell_id, self.resume_from["key"])
        data = self.read()
        if data is None:  # deleted by hand: the pointer goes too
            self.held.publish({"checkpoint": {"missing": self.resume_from["key"]}})
            self.resume_from = self._current = None
            return None, f"cell {self.cell_id} ({label}): {where} is missing; the cell starts again from scratch"
        try:
            load_state(data, device, what=where)
        except CorruptCheckpoint as exc:
            return None, (f"cell {self.cell_id} ({label}): {exc}; kept aside as "
                          f"{self.set_aside(str(exc))}; the cell starts again from scratch")
        return (data, self.resume_from), ""

    def set_aside(self, reason: str) -> str:
        """Move the unreadable checkpoint to ``<key>.corrupt-<time>`` and forget the pointer (the
        cell starts again from scratch); returns where it went."""
        key = self.resume_from["key"]
        aside = f"{key}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        src = self.storage.path(self.sweep, "cells", self.cell_id, key)
        self.storage.fs.move(src, self.storage.path(self.sweep, "cells", self.cell_id, aside))
        self.held.publish({"checkpoint": {"set_aside": aside, "reason": reason[:300]}})
        self.resume_from = self._current = None
        return self.storage.path(self.sweep, "cells", self.cell_id, aside)

    def publish(self, data: bytes, step: int, run_id: str) -> None:
        """Write ``data`` (the state that went with report ``step`` of MLflow run ``run_id``)
        under a key of this attempt's, then point the cell at it; :class:`LeaseLost` (and the
        object deleted again) if the cell was taken over."""
        self.held.check()
        key = f"{self.held.epoch}.{int(step)}.{SUFFIX}"
        self.storage.write_bytes(data, self.sweep, "cells", self.cell_id, key)
        try:
            self.held.publish({"checkpoint": {"sweep": self.sweep, "experiment_id": self.experiment_id,
                                              "key": key, "step": int(step), "run_id": run_id,
                                              "epoch": self.held.epoch}})
        except LeaseLost:
            if key != self._current:
                with contextlib.suppress(Exception):
                    self.storage.delete(self.sweep, "cells", self.cell_id, key)
            self.discard()
            raise
        except Exception:   # no answer (a partition): it may have landed or not
            self._unsure.add(key)
            raise
        self._unsure.discard(key)
        previous, self._current = self._current, key
        if previous and previous != key:
            with contextlib.suppress(Exception):   # a leftover costs space, nothing else
                self.storage.delete(self.sweep, "cells", self.cell_id, previous)
