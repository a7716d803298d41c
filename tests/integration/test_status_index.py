"""The finished index (hpsweep.storage marks, hpsweep.store.runs.load_states) against a real
``mlflow server``, on a local directory and on S3 (moto_server): ``status`` read through the
index shows every cell in the state a full read of the sweep (``load_sweep``) shows, in every
kind of state a cell can be in, while asking MLflow only about the cells the index leaves open;
and it steps aside (None) wherever the index cannot be trusted."""

from __future__ import annotations

import json
import shutil

import pytest

from hpsweep.spec.model import load_spec_text
from hpsweep.spec.plan import plan
from hpsweep.store.leases import DONE, FAILED
from hpsweep.store.mlflow import TAG, SweepTracker, mlflow_client
from hpsweep.store.readers import RestReader
from hpsweep.store.runs import load_states, load_sweep
from hpsweep.store.storage import open_storage
from hpsweep.views.stats import completeness

pytestmark = pytest.mark.slow

SPEC = """
name: {name}
trainer: sleep
metric: {{name: loss, mode: min}}
parameters:
  x: {{range: [0, {last}]}}
seeds: 1
"""


def _spec(name: str, cells: int):
    return load_spec_text(SPEC.format(name=name, last=cells - 1), "index.yaml")


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, moto_server, aws_env):
    if request.param == "local":
        return open_storage(str(tmp_path / "store"))
    return open_storage(f"s3://{moto_server.create_bucket()}/store", moto_server.url)


def _child(tracker: SweepTracker, cell, status: str) -> str:
    run = tracker.client.create_run(tracker.experiment_id, tags={
        "mlflow.parentRunId": tracker.parent_run_id, TAG["role"]: "cell", TAG["sweep"]: tracker.sweep_name,
        TAG["cell"]: cell.id, TAG["seed"]: str(cell.seed), TAG["params"]: json.dumps(cell.params)})
    if status != "RUNNING":
        tracker.client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


class _Counting:
    """The searches load_states makes, through its REST reader (or MLflow's client)."""

    def __init__(self, monkeypatch):
        import hpsweep.store.runs as runs

        self.searches = 0
        real = runs.mlflow_client
        search = RestReader.search_runs

        def counted_search(reader, *a, **k):
            self.searches += 1
            return search(reader, *a, **k)

        def counted(uri):
            client = real(uri)
            client_search = client.search_runs

            def search_runs(*a, **k):
                self.searches += 1
                return client_search(*a, **k)

            client.search_runs = search_runs
            return client

        monkeypatch.setattr(runs, "mlflow_client", counted)
        monkeypatch.setattr(RestReader, "search_runs", counted_search)


def _states(cells, runs) -> dict[str, str]:
    return {c.cell_id: c.state for c in completeness(cells, runs).cells}


def test_index_answers_as_a_full_read_does(mlflow_server, storage, monkeypatch, request):
    spec = _spec(f"index-{request.node.callspec.id}", 60)
    cells = plan(spec)
    tracker = SweepTracker(mlflow_server.url, spec.name)
    tracker.start(spec.spec_hash(), "x", storage_uri=storage.uri)
    assert tracker.index, "a new sweep gets an index in its storage"
    kinds = {}
    for i, cell in enumerate(cells[:30]):
        if i < 20:   # finished and marked, as a trial leaves it
            _child(tracker, cell, "FINISHED")
            storage.mark_finished(tracker.index, cell.id)
        elif i < 23:  # finished, its lease ended done, the mark lost (killed between the two)
            _child(tracker, cell, "FINISHED")
            won, lease = storage.try_acquire(cell.id, "d", 30.0)
            storage.release(lease, DONE)
        elif i < 25:  # failed, then run again and finished, marked
            _child(tracker, cell, "FAILED")
            _child(tracker, cell, "FINISHED")
            storage.mark_finished(tracker.index, cell.id)
        elif i < 27:  # failed
            _child(tracker, cell, "FAILED")
            won, lease = storage.try_acquire(cell.id, "d", 30.0)
            storage.release(lease, FAILED)
        elif i < 28:  # running, its driver alive (a live lease)
            storage.try_acquire(cell.id, "d", 30.0)
            _child(tracker, cell, "RUNNING")
        else:         # RUNNING, its driver killed (no lease renewed)
            storage.try_acquire(cell.id, "d", 0.01)
            _child(tracker, cell, "RUNNING")
        kinds[cell.id] = i
    # an orphan: a cell of an older version of the file, finished and marked
    other = plan(_spec(spec.name, 101))[-1]
    _child(tracker, other, "FINISHED")
    storage.mark_finished(tracker.index, other.id)

    count = _Counting(monkeypatch)
    assert RestReader.for_uri(mlflow_server.url) is not None  # read without MLflow's client
    fast = load_states(mlflow_server.url, spec.name, [c.id for c in cells], lambda uri: open_storage(uri, storage.endpoint))
    assert fast is not None and fast.storage == storage.uri
    # the parents, the runs not FINISHED, the runs stopped early, and one search for each of the
    # 3 unmarked cells whose leases ended (the failed and running cells have runs that are not
    # FINISHED)
    assert count.searches == 1 + 1 + 1 + 3
    full = load_sweep(mlflow_server.url, spec.name)
    assert _states(cells, fast) == _states(cells, full)
    # read with MLflow's own client (as where credentials are set): the very same cells
    count.searches = 0
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "false")
    with_client = load_states(mlflow_server.url, spec.name, [c.id for c in cells],
                              lambda uri: open_storage(uri, storage.endpoint))
    monkeypatch.delenv("MLFLOW_TRACKING_INSECURE_TLS")
    assert with_client.cells == fast.cells and with_client.parent_run_id == fast.parent_run_id
    assert count.searches == 1 + 1 + 1 + 3
    counts = completeness(cells, fast).counts
    assert (counts["done"], counts["failed"], counts["running"], counts["pending"]) == (25, 2, 3, 30)
    assert [o.cell_id for o in completeness(cells, fast).orphans] == [other.id]

    # many unmarked cells that ran: one read of the sweep's finished runs, not a search each
    for cell in cells[30:]:
        _child(tracker, cell, "FINISHED")
        won, lease = storage.try_acquire(cell.id, "d", 30.0)
        storage.release(lease, DONE)
    count.searches = 0
    fast = load_states(mlflow_server.url, spec.name, [c.id for c in cells], lambda uri: open_storage(uri, storage.endpoint))
    assert fast is not None and count.searches == 1 + 1 + 1 + 1
    assert _states(cells, fast) == _states(cells, load_sweep(mlflow_server.url, spec.name))
    assert completeness(cells, fast).counts["done"] == 55

    # a driver with the same storage keeps the index
    again = SweepTracker(mlflow_server.url, spec.name)
    again.start(spec.spec_hash(), "x", storage_uri=storage.uri)
    assert again.index == tracker.index


def test_index_steps_aside_when_it_cannot_be_trusted(mlflow_server, tmp_path):
    spec = _spec("index-mixed", 4)
    cells = plan(spec)
    one, two = open_storage(str(tmp_path / "one")), open_storage(str(tmp_path / "two"))
    tracker = SweepTracker(mlflow_server.url, spec.name)
    tracker.start(spec.spec_hash(), "x", storage_uri=one.uri)
    _child(tracker, cells[0], "FINISHED")
    one.mark_finished(tracker.index, cells[0].id)
    ids = [c.id for c in cells]
    assert load_states(mlflow_server.url, spec.name, ids, open_storage) is not None
    # its storage gone, or its marks: a full read instead of showing finished cells pending
    assert load_states(mlflow_server.url, spec.name, ids, lambda uri: None) is None
    shutil.rmtree(one.local_path("finished"))
    assert load_states(mlflow_server.url, spec.name, ids, open_storage) is None
    one.mark_finished(tracker.index, cells[0].id)
    # a driver with another storage: its cells' leases and marks are elsewhere, so never again
    other = SweepTracker(mlflow_server.url, spec.name)
    other.start(spec.spec_hash(), "x", storage_uri=two.uri)
    assert other.index is None
    assert mlflow_client(mlflow_server.url).get_experiment_by_name(spec.name).tags[TAG["index"]] == "mixed"
    assert load_states(mlflow_server.url, spec.name, ids, open_storage) is None
    back = SweepTracker(mlflow_server.url, spec.name)
    back.start(spec.spec_hash(), "x", storage_uri=one.uri)
    assert back.index is None
    # never tracked
    assert load_states(mlflow_server.url, "index-never", ids, open_storage) is None
