"""The driver's cell queue: which cell the next trial runs, given the leases in the shared storage
and the runs in MLflow. Knows nothing of Ray Tune (the engine adapts it to Tune's searcher).

A cell another driver holds is waited for, one whose holder died is taken over, one another sweep
finished is copied in (:func:`adopt`), and each cell with a FINISHED run gets its mark in the
sweep's finished index (:func:`mark_finished`)."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import time

from hpsweep.run.trial import CELL, CELL_S, ENDED_BATCH, HELD_BY, LOST
from hpsweep.spec.plan import Cell
from hpsweep.store.leases import DONE, FAILED, Lease, driver_id
from hpsweep.store.mlflow import SweepTracker
from hpsweep.store.storage import Storage
from hpsweep.views.live import LiveTable

__all__ = ["FINISHED", "CellQueue", "adopt", "mark_finished", "spread"]

FINISHED = "FINISHED"          # the search is over (Tune's Searcher.FINISHED has this value)
_BUNDLE_S = 10.0               # bundle: auto fills a trial with about this many seconds of cells
_BUNDLE_MAX = 256


def spread(cells: list[Cell]) -> list[Cell]:
    """The cells in plan order, seeds outermost (every configuration gets its first seed before
    any gets a second), but within each seed starting at a place of this driver's own: drivers
    started together then begin on different cells instead of all contending for the first."""
    if len(cells) < 2:
        return cells
    k = int(hashlib.sha256(driver_id().encode()).hexdigest(), 16)
    by_seed: dict[int, list[Cell]] = {}
    for c in cells:
        by_seed.setdefault(c.seed, []).append(c)
    out: list[Cell] = []
    for group in by_seed.values():
        j = k % len(group)
        out += group[j:] + group[:j]
    return out


_SETTLE_SEARCHES = 20   # waited-for cells asked about one search each; more: one read of the sweep


class CellQueue:
    """The grid's cells to Tune one at a time, as it has room for a trial (the engine adapts it
    to Tune's searcher interface).

    A cell whose lease another driver holds, live or done, is passed over and waited for
    (polling its lease and MLflow); one whose lease expires unfinished (its driver died) or is
    released is handed out again, and its trial takes it over from its checkpoint. A lease
    record says how a waited-for cell ended: ``done`` in this sweep (its run is in MLflow),
    ``done`` in another sweep sharing the cell (its run is copied into this one), ``failed``
    (that driver's failure, not this one's). The search ends when every cell has been run
    here or settled elsewhere. Trials still take each lease atomically (``hpsweep.run.trial``): the
    look here only spares a trial for cells already taken."""

    def __init__(self, cells: list[Cell], storage: Storage, tracker: SweepTracker, table: LiveTable,
                 context: dict, bundle: int | str = 1, slots: int = 1) -> None:
        self.bundle, self.slots = bundle, max(1, slots)   # bundle: 1 (a cell a trial), N, "auto"
        self.cell_seconds, self.cells_timed = 0.0, 0
        self.storage, self.tracker, self.table = storage, tracker, table
        self.experiment_id, self.cells = context["experiment_id"], context["cells"]
        self.queue = collections.deque(c.id for c in cells)
        self.waiting: dict[str, str] = {}     # cell id -> its holder
        self.force: set[str] = set()          # done records this sweep's MLflow lacks
        self.active = 0                       # trials handed out and not ended
        self.elsewhere = 0                    # cells settled by other drivers
        self.settled_by: dict[str, tuple[str, str]] = {}   # cell id -> (done | failed, by whom)
        self.copied = 0                       # of which copied in from another sweep
        self.poll = min(2.0, max(0.2, context["lease_ttl"] / 6))
        self._next_poll = 0.0

    def __getstate__(self) -> dict:  # Tune may pickle its searcher; clients stay out
        return {**self.__dict__, "storage": None, "tracker": None, "table": None}

    def bundle_size(self) -> int:
        """Cells for the next trial. ``auto``: as many as fill about ``_BUNDLE_S`` seconds at
        the mean duration of the cells ended so far (one until a cell has ended: long cells
        keep a trial each); never more than half an even share of the queue over the slots, so
        that bundles shrink towards the end and every slot works until about the same time."""
        if self.bundle == 1:
            return 1
        if self.bundle == "auto":
            if not self.cells_timed:
                return 1
            mean = self.cell_seconds / self.cells_timed
            n = int(_BUNDLE_S / max(mean, 1e-3))
        else:
            n = int(self.bundle)
        share = -(-len(self.queue) // (2 * self.slots))
        return max(1, min(n, share, _BUNDLE_MAX))

    def requeue(self, cells: list[str]) -> None:
        """Cells of a bundle to hand out again (a retry, or a bundle cut short)."""
        self.queue.extendleft(reversed(cells))

    def suggest(self) -> dict | str | None:
        """The next trial's config, None for not yet, or :data:`FINISHED`."""
        size, picked = self.bundle_size(), []
        while self.queue and len(picked) < size:
            cid = self.queue.popleft()
            lease = None if cid in self.force else self.storage.read_lease(cid)
            if lease is not None and (lease.live or lease.state == DONE):
                self.waiting[cid] = lease.owner
                if lease.live:  # a done one is settled (or copied in) at the next poll
                    self.table.elsewhere(None, cid, lease.owner)
                continue
            picked.append(cid)
        if picked:
            self.active += 1
            forced = [c for c in picked if c in self.force]
            if self.bundle == 1:
                return {"cell": picked[0], **({"force": True} if forced else {})}
            return {"cells": picked, **({"force": forced} if forced else {})}
        if self.waiting and time.time() >= self._next_poll:
            self._next_poll = time.time() + self.poll
            self._settle()
            if self.queue:
                return self.suggest()
        if not self.waiting and self.active <= 0:
            return FINISHED
        return None

    def on_result(self, result: dict) -> None:
        if HELD_BY in result:  # its trial lost the race for the lease: wait for the cell
            self.waiting[result[CELL]] = result[HELD_BY]
        for marker in json.loads(result.get(ENDED_BATCH, "[]")):
            if marker.get(LOST):  # taken over by another driver: wait for it to settle there
                self.waiting[marker[CELL]] = marker[HELD_BY]
                continue
            self.cell_seconds += float(marker[CELL_S])
            self.cells_timed += 1

    def on_complete(self, result: dict | None) -> None:
        self.active -= 1
        if result and HELD_BY in result:  # its trial lost the race for the lease
            self.waiting[result[CELL]] = result[HELD_BY]

    def _settle(self) -> None:
        leases = {cid: self.storage.read_lease(cid) for cid in self.waiting}
        # a failed lease settles its cell without MLflow; a live one is still at work
        ended_here = [cid for cid, lease in leases.items()
                      if lease is None or not (lease.live or lease.state == FAILED)]
        finished = self._finished(ended_here)
        taken = []
        for cid, lease in leases.items():
            if cid in finished or (lease is not None and lease.state == FAILED):
                ended = "done" if cid in finished else "failed"
            elif lease is not None and lease.live:
                continue
            elif lease is not None and lease.state == DONE:
                if adopt(self.tracker, self.storage, self.cells[cid], lease):
                    ended = "done"
                    self.copied += 1
                    self.table.copied(cid, lease.info.get("sweep", "?"))
                elif lease.info.get("experiment_id") == self.experiment_id \
                        and lease.info.get("tracking_uri") == self.tracker.tracking_uri \
                        and lease.expires > time.time() - 30:
                    continue  # just finished in this sweep: MLflow's search shows it next time
                else:
                    self.force.add(cid)  # done where this sweep's MLflow cannot see: run it
                    taken.append(cid)
                    continue
            else:  # expired, released, stopped: its runner is gone
                taken.append(cid)
                continue
            self.waiting.pop(cid)
            self.elsewhere += 1
            self.settled_by[cid] = (ended, lease.owner if lease is not None else "?")
            self.table.settled(cid, ended)
        for cid in taken:
            self.waiting.pop(cid)
            self.table.settled(cid, "released")
            self.queue.appendleft(cid)
        if taken:
            self.table.note(f"taking over {len(taken)} cells whose leases expired or were released")

    def _finished(self, cells: list[str]) -> set[str]:
        """Which of ``cells`` (waited-for cells whose leases are no longer live) have a FINISHED
        run in this sweep: a search per cell when they are few, one read of the sweep when many.
        A cell whose lease is still live is not asked about: its holder is still at work."""
        if len(cells) > _SETTLE_SEARCHES:
            return self.tracker.finished_cells() & set(cells)
        return {cid for cid in cells if self.tracker.cell_finished(cid)}


def adopt(tracker: SweepTracker, storage: Storage, cell: Cell, lease: Lease) -> bool:
    """A cell done by another sweep that shares it (same content id), tracked in the same
    MLflow: its run is copied into this sweep (once: under a lock), not trained again."""
    info = lease.info
    if info.get("experiment_id") in (None, tracker.experiment_id) or \
            info.get("tracking_uri") != tracker.tracking_uri or not info.get("run_id"):
        return False
    with storage.lock(f"adopt-{tracker.experiment_id}-{cell.id}"):
        adopted = tracker.cell_finished(cell.id) or tracker.adopt(cell, info["run_id"], info.get("sweep", ""))
    if adopted and tracker.index:
        mark_finished(storage, tracker.index, {cell.id})
    return adopted


def mark_finished(storage: Storage, index: str, cells: set[str]) -> None:
    """Add ``cells`` (each with a FINISHED run now) to the sweep's finished index; S3 writes in
    a thread pool. A mark that fails to be written costs ``status`` a search, nothing more."""
    from concurrent.futures import ThreadPoolExecutor

    def mark(cid: str) -> None:
        with contextlib.suppress(Exception):
            storage.mark_finished(index, cid)

    if len(cells) < 8 or not storage.is_s3:
        for cid in cells:
            mark(cid)
        return
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(mark, cells))
