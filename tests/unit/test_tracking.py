"""CellTracker's ordering and failure handling, against a recording stand-in for its client
(the real client against a real server is exercised by tests/integration/test_engine.py)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from mlflow.entities import Metric, RunData, RunTag

import hpsweep.store.tracker as tracking
from hpsweep.spec.plan import Cell


class FakeClient:
    """Records every call; ``fail_batches`` makes that many metric log_batch calls fail."""

    def __init__(self, existing=(), fail_batches: int = 0, search_s: float = 0.0) -> None:
        self.events: list[tuple] = []
        self.search_s = search_s
        self.existing = list(existing)
        self.fail_batches = fail_batches
        self.lock = threading.Lock()
        self.deleted: set[str] = set()
        self.history: dict[tuple[str, str], list] = {}   # (metric, run id) -> points

    def search_runs(self, *args, **kwargs):
        time.sleep(self.search_s)
        return self.existing

    def create_run(self, experiment_id, run_name, tags, start_time=None):
        self.events.append(("create", tags["hpsweep.cell_id"]))
        return SimpleNamespace(info=SimpleNamespace(run_id="new-run"))

    def update_run(self, run_id, status):
        self.events.append(("update", run_id, status))

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        with self.lock:
            if run_id in self.deleted:
                raise RuntimeError(f"The run {run_id} must be in the 'active' state. Current state is deleted.")
            if metrics and self.fail_batches > 0:
                self.fail_batches -= 1
                raise ConnectionError("503 from the tracking server")
            if metrics:
                self.events.append(("metrics", run_id, [(m.key, m.step, m.value) for m in metrics]))
            if params:
                self.events.append(("params", run_id, len(params)))
            if tags:
                self.events.append(("tags", run_id, {t.key: t.value for t in tags}))

    def set_terminated(self, run_id, status, end_time=None):
        if run_id in self.deleted:
            raise RuntimeError(f"The run {run_id} must be in the 'active' state. Current state is deleted.")
        self.events.append(("terminated", run_id, status))

    def set_tag(self, run_id, key, value):
        self.events.append(("tag", run_id, key, value))

    def delete_run(self, run_id):
        self.deleted.add(run_id)
        self.events.append(("delete", run_id))

    def get_run(self, run_id):
        return SimpleNamespace(data=SimpleNamespace(metrics={k: 0.0 for k, _ in self.history}))

    def get_metric_history(self, run_id, key):
        return list(self.history.get((key, run_id), []))


CELL = Cell("abc123", 0, 1, {"x": 0.5}, {"x": 0.5, "seed": 1, "reports": 3})


def make(monkeypatch, client: FakeClient, writes: list, flush_s: float = 0.01):
    monkeypatch.setattr(tracking, "worker_client", lambda uri: client)
    monkeypatch.setattr(tracking, "_FLUSH_S", flush_s)
    return tracking.CellTracker("http://unused", "1", "parent", "sweep", CELL,
                                write_checkpoint=lambda data, step, run_id: writes.append(("checkpoint", data))
                                or client.events.append(("checkpoint", data)))


def sent_metrics(client: FakeClient) -> list:
    return [row for e in client.events if e[0] == "metrics" for row in e[2]]


def test_new_run_gets_params_then_metrics_then_finished(monkeypatch) -> None:
    client, writes = FakeClient(), []
    tracker = make(monkeypatch, client, writes)
    for step in (1, 2, 3):
        tracker.log(step, {"loss": 1.0 / step})
    tracker.finish("FINISHED")
    kinds = [e[0] for e in client.events]
    # the params go out in the same request as the first metrics
    assert kinds[:3] == ["create", "metrics", "params"] and kinds[-1] == "terminated"
    assert ("params", "new-run", 3) in client.events
    assert sent_metrics(client) == [("loss", 1, 1.0), ("loss", 2, 0.5), ("loss", 3, 1 / 3)]
    assert client.events[-1] == ("terminated", "new-run", "FINISHED")


def test_checkpoint_is_written_only_after_the_metrics_it_came_with(monkeypatch) -> None:
    client, writes = FakeClient(), []
    tracker = make(monkeypatch, client, writes)
    for step in range(1, 30):
        tracker.log(step, {"loss": float(step)}, checkpoint=f"state-{step}".encode())
    tracker.finish("FAILED")  # a failed cell keeps its checkpoint for the retry
    sent_steps: set[int] = set()
    for event in client.events:
        if event[0] == "metrics":
            sent_steps |= {row[1] for row in event[2]}
        if event[0] == "checkpoint":
            step = int(event[1].decode().split("-")[1])
            assert set(range(1, step + 1)) <= sent_steps, f"checkpoint {step} ran ahead of the metrics"
    assert writes and writes[-1][1] == b"state-29"


def test_a_failed_batch_is_sent_again_not_lost_nor_doubled(monkeypatch) -> None:
    client, writes = FakeClient(fail_batches=3), []
    tracker = make(monkeypatch, client, writes)
    for step in range(1, 6):
        tracker.log(step, {"loss": float(step)})
    tracker.finish("FINISHED")
    assert sorted(r[1] for r in sent_metrics(client)) == [1, 2, 3, 4, 5]


def test_a_finished_cell_writes_its_last_checkpoint(monkeypatch) -> None:
    client, writes = FakeClient(search_s=0.5), []  # a slow server: the run opens late
    tracker = make(monkeypatch, client, writes, flush_s=60)
    tracker.log(1, {"loss": 1.0}, checkpoint=b"state-1")
    tracker.finish("FINISHED")  # the cell ended before its run was open: no flush yet
    assert writes == [("checkpoint", b"state-1")]
    kinds = [e[0] for e in client.events]
    assert kinds.index("metrics") < kinds.index("checkpoint") < kinds.index("terminated")


def test_a_resumed_attempt_continues_the_history_up_to_its_checkpoint(monkeypatch) -> None:
    # An earlier attempt sent loss and score up to step 3 (a retried request put step 1 in
    # twice), then was killed after its step-2 checkpoint; this attempt resumes from it.
    old = SimpleNamespace(info=SimpleNamespace(run_id="old-run", status="KILLED"),
                          data=RunData(tags=[RunTag("hpsweep.attempts", "1")]))
    client, writes = FakeClient(existing=[old]), []
    client.history = {(k, "old-run"): [Metric(k, float(s), s, s) for s in (1, 1, 2, 3)] for k in ("loss", "score")}
    tracker = make(monkeypatch, client, writes)
    tracker.continue_from("old-run", 2)
    for step in (2, 3, 4):
        tracker.log(step, {"loss": 10.0 * step, "score": -10.0 * step})
    tracker.finish("FINISHED")
    assert tracker.run_id == "new-run"
    got = sorted(sent_metrics(client))
    assert got == [("loss", 1, 1.0), ("loss", 2, 2.0), ("loss", 3, 30.0), ("loss", 4, 40.0),
                   ("score", 1, 1.0), ("score", 2, 2.0), ("score", 3, -30.0), ("score", 4, -40.0)], got
    assert ("tags", "new-run", {"hpsweep.continues": "old-run"}) in client.events


def test_each_attempt_has_a_run_and_the_earlier_one_is_deleted(monkeypatch) -> None:
    """The old run's writer (a stalled holder) is then refused by the server: the fence."""
    old = SimpleNamespace(info=SimpleNamespace(run_id="old-run", status="KILLED"),
                          data=RunData(tags=[RunTag("hpsweep.attempts", "1")]))
    client, writes = FakeClient(existing=[old]), []
    tracker = make(monkeypatch, client, writes)
    assert tracker.run_id == "new-run"
    tracker.log(1, {"loss": 1.0})
    tracker.finish("FINISHED")
    created = client.events.index(("create", CELL.id))
    assert ("tag", "old-run", "hpsweep.superseded_by", "new-run") in client.events
    assert client.events.index(("delete", "old-run")) > created
    assert client.events[-1] == ("terminated", "new-run", "FINISHED")
    # no history copied: this attempt did not resume from a checkpoint (no mixed history)
    assert sent_metrics(client) == [("loss", 1, 1.0)]


def test_a_writer_whose_run_was_deleted_loses_the_cell(monkeypatch) -> None:
    client, writes = FakeClient(), []
    tracker = make(monkeypatch, client, writes)
    tracker.log(1, {"loss": 1.0})
    assert tracker.run_id == "new-run"
    client.deleted.add("new-run")
    with pytest.raises(tracking.LeaseLost, match="superseded"):
        tracker.finish("FINISHED")
    assert not [e for e in client.events if e[0] == "terminated"]


def test_a_finished_cell_is_never_run_twice(monkeypatch) -> None:
    done = SimpleNamespace(info=SimpleNamespace(run_id="done-run", status="FINISHED"),
                           data=SimpleNamespace(tags={}))
    client, writes = FakeClient(existing=[done]), []
    tracker = make(monkeypatch, client, writes)
    with pytest.raises(RuntimeError, match="could not be opened: cell abc123 already has a finished run"):
        tracker.run_id
    with pytest.raises(tracking.AlreadyFinished, match="already has a finished run"):
        tracker.check()
