"""Bundles: how many cells the queue hands a trial (auto: about ten seconds of cells at the
measured mean, one before any cell has ended, never more than an even share of what is left)
and what it hands out (cells nobody else holds)."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from hpsweep.spec.plan import Cell
from hpsweep.store.leases import DONE, FAILED, HELD, Lease


class _Storage:
    def __init__(self, leases: dict[str, Lease] | None = None) -> None:
        self.leases = leases or {}

    def read_lease(self, key: str) -> Lease | None:
        return self.leases.get(key)


class _Table:
    def __init__(self) -> None:
        self.elsewhere_calls: list[str] = []

    def elsewhere(self, trial_id, cell_id, owner) -> None:
        self.elsewhere_calls.append(cell_id)

    def settled(self, cell_id, how) -> None:
        self.elsewhere_calls.append(f"{cell_id}:{how}")

    def note(self, text) -> None:
        pass


def _queue(n: int, bundle, slots: int = 2, leases: dict | None = None):
    # imported here, not at collection: other unit tests check that a bad sweep file never
    # imports ray.tune in their process
    from hpsweep.run.queue import CellQueue as _CellQueue

    cells = [Cell(f"c{i:03d}", i, 0, {"x": i}, {"x": i}) for i in range(n)]
    context = {"experiment_id": "1", "cells": {c.id: c for c in cells}, "lease_ttl": 30.0}
    tracker = SimpleNamespace(finished_cells=lambda *a: set(), tracking_uri="sqlite:///x")
    return _CellQueue(cells, _Storage(leases), tracker, _Table(), context, bundle=bundle, slots=slots)


def _ended(queue, seconds: float, n: int = 4) -> None:
    """``n`` cells of ``seconds`` each ended, told in one result (as a bundle batches them)."""
    markers = [{"hpsweep/cell": f"x{i}", "hpsweep/ended": "done", "hpsweep/cell_s": seconds} for i in range(n)]
    queue.on_result({"step": -1, "hpsweep/ended_batch": json.dumps(markers)})


def test_auto_starts_with_one_cell_a_trial_then_fills_ten_seconds() -> None:
    q = _queue(1000, "auto")
    assert q.bundle_size() == 1           # nothing measured yet: a long cell keeps its own trial
    _ended(q, 0.5)
    assert q.bundle_size() == 20          # 10 s / 0.5 s
    _ended(q, 60.0, n=100)                # long cells: one a trial again
    assert q.bundle_size() == 1


def test_a_bundle_is_never_more_than_half_an_even_share_of_the_queue() -> None:
    q = _queue(30, "auto", slots=4)
    _ended(q, 0.01)                       # 1,000 cells would fill ten seconds
    assert q.bundle_size() == 4           # ceil(30 / (2 x 4)): bundles shrink towards the end
    assert _queue(30, 7, slots=2).bundle_size() == 7    # a fixed size is a ceiling ...
    assert _queue(20, 7, slots=2).bundle_size() == 5    # ... under the same share
    assert _queue(3, 7, slots=2).bundle_size() == 1


def test_bundle_one_hands_out_single_cells_and_bundles_hand_out_lists() -> None:
    single = _queue(5, 1)
    assert single.suggest() == {"cell": "c000"}
    bundled = _queue(9, 2, slots=1)
    assert bundled.suggest() == {"cells": ["c000", "c001"]}
    assert bundled.suggest() == {"cells": ["c002", "c003"]}
    assert bundled.suggest() == {"cells": ["c004", "c005"]}
    assert bundled.suggest() == {"cells": ["c006", "c007"]}   # ceil(3 / 2) = 2
    assert bundled.suggest() == {"cells": ["c008"]}
    assert bundled.active == 5


def test_cells_held_elsewhere_are_passed_over_and_requeued_cells_come_first() -> None:
    now = time.time()
    leases = {"c001": Lease("c001", HELD, "h", "other:1", now + 30, {}),
              "c002": Lease("c002", DONE, "h", "other:1", now - 5, {})}
    q = _queue(12, 4, slots=1, leases=leases)
    assert q.suggest() == {"cells": ["c000", "c003", "c004", "c005"]}
    assert set(q.waiting) == {"c001", "c002"}
    q.requeue(["c004", "c005"])          # a bundle cut short: its unstarted cells go first, in order
    assert list(q.queue)[:2] == ["c004", "c005"]


@pytest.mark.parametrize("bundle", [0, -3])
def test_bundle_must_be_auto_or_positive(tmp_path, bundle) -> None:
    from hpsweep.errors import UserError
    from hpsweep.spec.model import load_spec

    path = tmp_path / "s.yaml"
    path.write_text(f"name: b\ntrainer: sleep\nmetric: {{name: loss, mode: min}}\nbundle: {bundle}\n")
    with pytest.raises(UserError, match=r"s\.yaml:4: bundle: must be 'auto' or a number of cells >= 1"):
        load_spec(str(path))


def test_bundles_need_fifo(tmp_path) -> None:
    from hpsweep.errors import UserError
    from hpsweep.spec.model import load_spec

    path = tmp_path / "s.yaml"
    path.write_text("name: b\ntrainer: sleep\nmetric: {name: loss, mode: min}\n"
                    "scheduler: {type: asha, max_t: 3}\nbundle: 4\nparameters:\n  x: {grid: [1, 2]}\n")
    with pytest.raises(UserError, match=r"s\.yaml:5: bundle: .*scheduler fifo"):
        load_spec(str(path))
    path.write_text(path.read_text().replace("bundle: 4", "bundle: auto"))
    spec = load_spec(str(path))
    assert not spec.bundles()   # auto under ASHA: one cell a trial


class _Tracker:
    """Counts MLflow reads: one search per cell, or one read of the whole sweep."""

    tracking_uri = "sqlite:///x"

    def __init__(self, finished: set[str]) -> None:
        self.finished, self.searched, self.whole_reads = finished, [], 0

    def cell_finished(self, cell_id: str) -> bool:
        self.searched.append(cell_id)
        return cell_id in self.finished

    def finished_cells(self) -> set[str]:
        self.whole_reads += 1
        return set(self.finished)


def _waiting_queue(leases: dict, finished: set[str], n: int = 200):
    from hpsweep.run.queue import CellQueue as _CellQueue

    cells = [Cell(f"c{i:03d}", i, 0, {"x": i}, {"x": i}) for i in range(n)]
    context = {"experiment_id": "1", "cells": {c.id: c for c in cells}, "lease_ttl": 30.0}
    tracker = _Tracker(finished)
    q = _CellQueue(cells, _Storage(leases), tracker, _Table(), context, bundle=1, slots=1)
    q.queue.clear()
    q.waiting = {cid: "other:1" for cid in leases}
    return q, tracker


def test_settling_asks_mlflow_only_about_cells_whose_leases_ended() -> None:
    now = time.time()
    leases = {"c000": Lease("c000", HELD, "h", "other:1", now + 30, {}),        # still at work
              "c001": Lease("c001", HELD, "h", "other:1", now - 1, {}),         # its driver died
              "c002": Lease("c002", HELD, "h", "other:1", now - 1, {}),         # died after finishing
              "c003": Lease("c003", FAILED, "h", "other:1", now - 1, {})}       # failed there
    q, tracker = _waiting_queue(leases, finished={"c002"})
    q._settle()
    assert sorted(tracker.searched) == ["c001", "c002"] and tracker.whole_reads == 0
    assert list(q.waiting) == ["c000"]            # the live one is still waited for
    assert list(q.queue) == ["c001"]              # the dead one is taken over
    assert {"c002:done", "c003:failed"} <= set(q.table.elsewhere_calls) and q.elsewhere == 2


def test_settling_many_ended_cells_reads_the_sweep_once() -> None:
    now = time.time()
    leases = {f"c{i:03d}": Lease(f"c{i:03d}", HELD, "h", "other:1", now - 1, {}) for i in range(50)}
    q, tracker = _waiting_queue(leases, finished={f"c{i:03d}" for i in range(0, 50, 2)})
    q._settle()
    assert tracker.searched == [] and tracker.whole_reads == 1
    assert len(q.queue) == 25 and q.elsewhere == 25 and not q.waiting
