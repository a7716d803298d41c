"""A bundle closes each cell (run FINISHED, finished mark, lease done, the driver told) in a
thread of its own while the next cell trains: the real bundle trial (hpsweep.run.trial), the sleep
trainer, a real local storage with real leases; the tracking client is a recorder that takes
``FINISH_S`` to finish a run (the round trips to a tracking server), so that overlap shows in
the wall time, and that can be told to fail for one cell."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest

import hpsweep.run.trial as trial
from hpsweep.spec.plan import Cell
from hpsweep.store.leases import DONE, FAILED
from hpsweep.store.storage import open_storage

FINISH_S, SLEEP_S, N = 0.3, 0.4, 4   # a close is shorter than a cell: none waits for another


class _Tracker:
    """CellTracker's surface as the trial uses it, recording when each cell finished."""

    events: list[tuple[str, str, float]] = []
    fail_for: set[str] = set()
    open_now = most_open = 0   # runs opened and not yet finished

    def __init__(self, tracking_uri, experiment_id, parent_run_id, sweep, cell, extra_tags=None,
                 write_checkpoint=None, fresh=False, **fences) -> None:
        _Tracker.open_now += 1
        _Tracker.most_open = max(_Tracker.most_open, _Tracker.open_now)
        self.cell, self.write_checkpoint = cell, write_checkpoint
        self.run_id = f"run-{cell.id}"
        self.client = SimpleNamespace(log_text=lambda *a, **k: None)
        self.start_ms, self.trained_ms, self.end_ms = int(time.time() * 1000), None, None   # the run's

    def trained(self):
        self.trained_ms = self.trained_ms or int(time.time() * 1000)
        return self.trained_ms

    @property
    def duration_s(self):
        return None if self.end_ms is None else (self.end_ms - self.start_ms) / 1000.0

    def check(self) -> None:
        pass

    def log(self, step, metrics, checkpoint=None) -> None:
        self.events.append((self.cell.id, "log", time.perf_counter()))
        if checkpoint is not None:
            self.write_checkpoint(checkpoint, step, self.run_id)

    def finish(self, status="FINISHED", tags=None) -> None:
        if status == "FINISHED":
            self.events.append((self.cell.id, "finishing", time.perf_counter()))
            time.sleep(FINISH_S)
            if self.cell.id in self.fail_for:
                raise ConnectionError("tracking server unreachable")
        _Tracker.open_now -= 1
        self.end_ms = self.trained()
        _Tracker.durations[self.cell.id] = self.duration_s
        self.events.append((self.cell.id, status, time.perf_counter()))

    def abandon(self) -> None:
        self.events.append((self.cell.id, "abandoned", time.perf_counter()))


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    monkeypatch.setattr(trial, "CellTracker", _Tracker)
    monkeypatch.setattr(trial, "ray", SimpleNamespace(
        get_gpu_ids=lambda: [], get_runtime_context=lambda: SimpleNamespace(get_node_id=lambda: "n"),
        util=SimpleNamespace(get_node_ip_address=lambda: "127.0.0.1")))
    _Tracker.events, _Tracker.fail_for, _Tracker.open_now, _Tracker.most_open = [], set(), 0, 0
    _Tracker.durations = {}
    storage = open_storage(str(tmp_path / "store"))
    cells = [Cell(f"c{i}", i, 0, {"x": float(i)}, {"x": float(i), "reports": 2, "sleep": SLEEP_S / 2,
                                                   "seed": 0}) for i in range(N)]
    context = {"trainer": "sleep", "sweep": "s", "tracking_uri": "http://unused", "experiment_id": "1",
               "parent_run_id": "p", "storage": storage.spec(), "every": 1, "cpus": 1, "metric": "loss",
               "optuna": False, "bases": [], "driver": "d", "lease_ttl": 30.0, "index": "ix",
               "cells": {c.id: c for c in cells}, "ran": frozenset()}
    results: list[tuple[dict, str]] = []
    host = trial.Host(lambda r: results.append((r, threading.current_thread().name)), "t1")
    return storage, cells, context, host, results


def _ended(results) -> list[dict]:
    return [m for r, _ in results for m in json.loads(r.get(trial.ENDED_BATCH, "[]"))]


def test_cells_close_in_the_background_in_order_and_the_trial_waits_for_the_last(bundle):
    storage, cells, context, host, results = bundle
    trial.run_trial({"cells": [c.id for c in cells]}, context, host)
    returned = time.perf_counter()
    at = {(cid, what): t for cid, what, t in _Tracker.events if what != "log"}
    logs = {}
    for cid, what, t in _Tracker.events:
        if what == "log":
            logs.setdefault(cid, []).append(t)
    finished = [cid for cid, what, _ in _Tracker.events if what == "FINISHED"]
    assert finished == [c.id for c in cells]  # closed in the order they trained
    for before, after in zip(cells, cells[1:]):
        # this cell's run was finished while the next one trained (between its two reports,
        # SLEEP_S / 2 apart); closed inline, it would have been finished before the next began
        assert logs[after.id][0] < at[(before.id, "FINISHED")] < logs[after.id][1], _Tracker.events
    assert at[(cells[-1].id, "FINISHED")] <= returned  # the trial waited for the last one
    for c in cells:
        lease = storage.read_lease(c.id)
        assert lease.state == DONE and lease.info["run_id"] == f"run-{c.id}"
    assert storage.finished_marks("ix") == {c.id for c in cells}
    ended = _ended(results)
    assert sorted(m[trial.CELL] for m in ended) == [c.id for c in cells]
    assert all(m[trial.ENDED] == "done" for m in ended), ended
    # each cell's time, as the live lines show it, is its run's duration as MLflow has it
    assert {m[trial.CELL]: m[trial.CELL_S] for m in ended} == _Tracker.durations, ended
    assert all(m[trial.RUN_AGE] >= 0 for m in ended), ended
    assert {thread for _, thread in results} == {threading.current_thread().name}  # only the trial reports


def test_a_cell_that_fails_to_close_is_reported_failed_and_the_rest_go_on(bundle):
    storage, cells, context, host, results = bundle
    _Tracker.fail_for = {cells[1].id}
    trial.run_trial({"cells": [c.id for c in cells]}, context, host)
    ended = {m[trial.CELL]: m for m in _ended(results)}
    assert ended[cells[1].id][trial.ENDED] == "failed"
    assert "tracking server unreachable" in ended[cells[1].id][trial.FAILURE]
    assert [ended[c.id][trial.ENDED] for c in cells if c is not cells[1]] == ["done"] * (N - 1)
    assert storage.read_lease(cells[1].id).state == FAILED
    assert cells[1].id not in storage.finished_marks("ix")
    # the failure was recorded on the run (FAILED) after the finish that raised
    assert (cells[1].id, "FAILED") in [(cid, status) for cid, status, _ in _Tracker.events]


def test_cells_faster_than_their_closes_wait_for_them(bundle):
    """Instant cells: closes would pile up (each with its run open on the tracking server);
    at most one waits while another runs, so at most three runs are open at a time."""
    storage, _, context, host, results = bundle
    cells = [Cell(f"i{i}", i, 0, {"x": float(i)}, {"x": float(i), "reports": 1, "sleep": 0.0, "seed": 0})
             for i in range(8)]
    context["cells"] = {c.id: c for c in cells}
    trial.run_trial({"cells": [c.id for c in cells]}, context, host)
    assert [cid for cid, what, _ in _Tracker.events if what == "FINISHED"] == [c.id for c in cells]
    assert _Tracker.most_open <= 3, _Tracker.most_open   # closing, waiting, training
    assert storage.finished_marks("ix") == {c.id for c in cells}
