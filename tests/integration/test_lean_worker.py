"""Lean workers (issue 24): a trial of a trainer that uses neither torch nor MLflow imports
neither, and the lean REST client writes what MLflow's own client reads back.

The trial runs for real: ``run_trial`` in a Ray worker of an in-process Ray started in a
subprocess (a plain Ray task, so that the worker has not imported Ray Tune or anything else the
driver has), tracking to the real ``mlflow server``, its checkpoints and lease in a local
storage; what it wrote is read back from MLflow and the storage.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hpsweep.store.rest import Metric, Param, RestClient, RunTag

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

TRIAL = textwrap.dedent('''
    import json, os, sys
    import ray
    from hpsweep.spec.model import load_spec
    from hpsweep.spec.plan import plan
    from hpsweep.store.leases import driver_id
    from hpsweep.store.mlflow import SweepTracker

    sweep, uri, storage, fallback = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    spec = load_spec(sweep)
    cells = plan(spec)
    tracker = SweepTracker(uri, spec.name)
    parent = tracker.start(spec.spec_hash(), open(sweep).read(), storage_uri=storage)
    context = {"trainer": spec.trainer, "sweep": spec.name, "tracking_uri": uri,
               "experiment_id": tracker.experiment_id, "parent_run_id": parent,
               "storage": {"uri": storage, "endpoint": None}, "every": spec.checkpoint.every,
               "cpus": 1, "metric": spec.metric.name, "optuna": False, "bases": [],
               "driver": driver_id(), "lease_ttl": 30.0, "index": tracker.index,
               "cells": {c.id: c for c in cells}, "ran": frozenset()}

    @ray.remote(num_cpus=1)
    def trial(config, context):
        from hpsweep.run.trial import Host, run_trial
        results = []
        run_trial(config, context, Host(results.append, "t0"))
        status = open("/proc/self/status").read()
        peak = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
        return {"modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "mlflow")),
                "results": len(results), "peak": peak}

    env = {"MLFLOW_TRACKING_TOKEN": "unused"} if fallback else {}
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             log_to_driver=False, runtime_env={"env_vars": env})
    out = ray.get(trial.remote({"cell": cells[0].id}, context))
    print("RESULT " + json.dumps({**out, "cell": cells[0].id, "experiment": tracker.experiment_id}))
''')


def _trial(tmp_path: Path, mlflow_server, fallback: bool) -> tuple[dict, Path]:
    """One cell of the sleep trainer through ``run_trial`` in a fresh Ray worker."""
    name = f"lean-{'mlflow' if fallback else 'rest'}-{os.getpid()}-{time.time_ns() % 10**6}"
    sweep = tmp_path / f"{name}.yaml"
    sweep.write_text(f"name: {name}\ntrainer: sleep\nmetric: {{name: loss, mode: min}}\n"
                     "config: {reports: 6, sleep: 0.2}\nparameters:\n  x: {grid: [0.5]}\n"
                     "checkpoint: {every: 2}\n")
    script = tmp_path / "trial.py"
    script.write_text(TRIAL)
    ray_tmp = Path(f"/tmp/hpl{os.getpid() % 10**5}")   # Ray's socket paths must stay short
    ray_tmp.mkdir(exist_ok=True)
    storage = tmp_path / "storage"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp), "HOME": str(tmp_path),
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run([sys.executable, str(script), str(sweep), mlflow_server.url, str(storage),
                          "1" if fallback else "0"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]) | {"name": name}, storage


def _check_stored(mlflow_server, got: dict, storage: Path) -> None:
    from hpsweep.store.checkpoints import stored_checkpoint
    from hpsweep.store.storage import open_storage
    from hpsweep.trainer.checkpoint import load_state

    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([got["experiment"]], "tags.`hpsweep.role` = 'cell'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    run = runs[0]
    assert run.data.tags["hpsweep.cell_id"] == got["cell"]
    assert run.data.params["x"] == "0.5" and run.data.params["reports"] == "6"
    assert int(run.data.tags["hpsweep.worker_pid"]) > 0
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]          # every step once, in order
    assert [m.value for m in history] == pytest.approx([0.25 + 1 / (s + 1) for s in range(6)])
    stored = stored_checkpoint(open_storage(str(storage)), got["name"], got["cell"])
    assert stored is not None and load_state(stored[0]) == {"step": 6}


def test_a_sleep_trial_imports_neither_torch_nor_mlflow(tmp_path, mlflow_server):
    got, storage = _trial(tmp_path, mlflow_server, fallback=False)
    assert got["modules"] == [], got["modules"]
    assert got["results"] == 6
    _check_stored(mlflow_server, got, storage)
    print(f"\nlean worker: peak RSS {got['peak'] / 2**20:.0f} MB (a plain Ray worker, no Tune)")


def test_with_credentials_configured_the_worker_writes_through_mlflows_client(tmp_path, mlflow_server):
    got, storage = _trial(tmp_path, mlflow_server, fallback=True)
    assert "mlflow.tracking" in got["modules"] and not any(m.startswith("torch") for m in got["modules"])
    _check_stored(mlflow_server, got, storage)


def test_the_rest_client_writes_and_reads_as_mlflows_client(mlflow_server):
    mlflow = MlflowClient(mlflow_server.url)
    lean = RestClient(mlflow_server.url)
    exp = mlflow.create_experiment(f"lean-client-{time.time_ns()}")
    run = lean.create_run(exp, tags={"a": "1", "mlflow.parentRunId": "p"}, run_name="cell x=1")
    rid = run.info.run_id
    lean.log_batch(rid, metrics=[Metric("loss", 0.5, 1000, 1), Metric("loss", 0.25, 2000, 2),
                                 Metric("odd", float("nan"), 2000, 2), Metric("big", float("inf"), 2000, 2)],
                   params=[Param("lr", "0.1")], tags=[RunTag("b", "2")])
    lean.set_tag(rid, "c", 3)
    lean.update_run(rid, status="RUNNING")
    got = mlflow.get_run(rid)
    assert got.info.run_name == "cell x=1" and got.info.status == "RUNNING"
    assert {k: got.data.tags[k] for k in ("a", "b", "c", "mlflow.parentRunId")} == {
        "a": "1", "b": "2", "c": "3", "mlflow.parentRunId": "p"}
    assert got.data.params == {"lr": "0.1"}
    assert got.data.metrics["loss"] == 0.25 and math.isnan(got.data.metrics["odd"])
    # infinity is stored as the store stores MLflow's own client's (the SQL store clamps it)
    other = mlflow.create_run(exp).info.run_id
    mlflow.log_metric(other, "big", float("inf"), step=2)
    assert got.data.metrics["big"] == mlflow.get_run(other).data.metrics["big"]
    mlflow.delete_run(other)
    assert [(m.step, m.value) for m in mlflow.get_metric_history(rid, "loss")] == [(1, 0.5), (2, 0.25)]
    # what the lean client reads is what MLflow's reads
    mine = lean.get_run(rid)
    assert (mine.info.run_id, mine.info.status, mine.info.start_time) == (rid, "RUNNING", got.info.start_time)
    assert mine.data.tags == got.data.tags and mine.data.params == got.data.params
    assert mine.data.metrics["loss"] == 0.25 and math.isnan(mine.data.metrics["odd"])
    assert {(m.key, m.step) for m in mine.data.to_proto().metrics} == {
        (m.key, m.step) for m in got.data.to_proto().metrics}
    # searches: a filter, an order, pages
    second = lean.create_run(exp, tags={"a": "2"}).info.run_id
    found = lean.search_runs([exp], "tags.a = '1'")
    assert [r.info.run_id for r in found] == [rid] and found.token is None
    newest = lean.search_runs([exp], "", order_by=["attributes.start_time DESC"], max_results=1)
    assert [r.info.run_id for r in newest] == [second] and newest.token
    rest = lean.search_runs([exp], "", order_by=["attributes.start_time DESC"], max_results=1,
                            page_token=newest.token)
    assert [r.info.run_id for r in rest] == [rid]
    assert lean.get_metric_history(rid, "loss") == [Metric("loss", 0.5, 1000, 1), Metric("loss", 0.25, 2000, 2)]
    lean.set_terminated(rid, status="KILLED")
    lean.set_terminated(second)
    assert mlflow.get_run(rid).info.status == "KILLED" and mlflow.get_run(rid).info.end_time
    assert mlflow.get_run(second).info.status == "FINISHED"
    # an artifact goes through MLflow's client, to the experiment's artifact store
    lean.log_text(rid, "trace", "error.txt")
    assert [f.path for f in mlflow.list_artifacts(rid)] == ["error.txt"]
    gone = lean.create_run(exp).info.run_id
    lean.delete_run(gone)
    assert mlflow.get_run(gone).info.lifecycle_stage == "deleted"
    assert gone not in {r.info.run_id for r in lean.search_runs([exp], "")}
    # a refused request says what the server said
    with pytest.raises(Exception, match="HTTP 404|RESOURCE_DOES_NOT_EXIST"):
        lean.get_run("0" * 32)
