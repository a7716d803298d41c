"""32 trials at once on a loopback Ray cluster of 4 nodes of 8 CPUs (issue 24), as a user runs a
sweep on a cluster: `hpsweep run --address` against a real `mlflow server`, checkpoints and leases
in S3 on moto_server. 64 cells of 5 s (5 reports of 1 s): each ends with one FINISHED run, every
step once, in order, its last checkpoint stored; and the slots stay busy once their workers are up.

Utilisation is measured on the stored runs: for each worker (the tag ``hpsweep.worker_pid``), the
cells' sleep over the span from its first cell's start to its last cell's end; the sweep's figure
is the sum of the sleep over the sum of those spans. The cluster-wide figure (over the span from
the first run to the last) is printed: on a 2-core machine it is bounded by the workers' start-up
(32 processes importing Ray Tune one after another), not by hpsweep.

A few minutes here (4 Ray nodes start, 32 workers on 2 cores): ``make test-scale`` runs it.
Measured on this 2-core machine: before the tracking server's pool was dropped (load 32 to 39
from other tests) the slots were busy 0.50 to 0.71 of the time once up; after (load 23, alone),
0.87, with 17 workers on 3 nodes up before the 64 cells were done. Over the runs' span 0.28:
the rest of the 32 workers were still importing Ray Tune (about 1.5 CPU seconds each)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from raynodes import start_ray_nodes
from test_engine import run_cli, sweep_file

pytestmark = [pytest.mark.slow, pytest.mark.scale]

NODES, CPUS, CELLS, REPORTS, SLEEP = 4, 8, 64, 5, 1.0


@pytest.fixture
def ray_nodes(moto_server):
    base = Path(tempfile.mkdtemp(prefix="hpn", dir="/tmp"))   # Ray's socket paths must stay short
    creds = {k: v for k, v in moto_server.env.items() if k.startswith("AWS_") and "ENDPOINT" not in k}
    nodes = start_ray_nodes(base, NODES, CPUS, node_env=creds)
    yield nodes
    nodes.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_thirty_two_slots_on_four_nodes_each_cell_once(tmp_path, ray_nodes, mlflow_server, moto_server, aws_env):
    from hpsweep.store.checkpoints import stored_checkpoint
    from hpsweep.store.storage import open_storage
    from hpsweep.trainer.checkpoint import load_state

    path, name = sweep_file(tmp_path, f"""
        config: {{reports: {REPORTS}, sleep: {SLEEP}}}
        parameters:
          x: {{range: [0, {CELLS - 1}]}}
        resources: {{cpus: 1}}
        checkpoint: {{every: 1}}
    """)
    bucket = moto_server.create_bucket()
    env = {**os.environ, **ray_nodes.env, **moto_server.env}
    t0 = time.perf_counter()
    out = run_cli(["run", str(path), "--address", ray_nodes.gcs_address, "--tracking-uri", mlflow_server.url,
                   "--storage", f"s3://{bucket}/s", "--s3-endpoint", moto_server.url, "--no-live"],
                  env, tmp_path, timeout=900)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"{CELLS} cells finished, 0 failed" in out.stdout, out.stdout[-2000:]

    client = MlflowClient(mlflow_server.url)
    storage = open_storage(f"s3://{bucket}/s", moto_server.url)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`hpsweep.role` = 'cell'", max_results=1000)
    by_cell: dict[str, list] = {}
    for r in runs:
        by_cell.setdefault(r.data.tags["hpsweep.cell_id"], []).append(r)
    assert len(by_cell) == CELLS
    assert all([r.info.status for r in rs] == ["FINISHED"] for rs in by_cell.values())
    assert sorted(int(float(r.data.params["x"])) for r in runs) == list(range(CELLS))
    for cell, (run,) in by_cell.items():
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == list(range(1, REPORTS + 1)), cell   # each step once, in order
        stored = stored_checkpoint(storage, name, cell)   # the checkpoint its lease published
        assert stored is not None and load_state(stored[0]) == {"step": REPORTS}
    # the trials ran on the cluster's nodes, not on one (Ray places actors where workers are up
    # first: on 2 cores the last node's may still be importing when the 64 cells are done)
    nodes_used = len({r.data.tags["hpsweep.node_id"] for r in runs})
    assert nodes_used >= NODES - 1, nodes_used

    per_worker: dict[str, list] = {}
    for r in runs:
        per_worker.setdefault(f"{r.data.tags['hpsweep.node_id']}/{r.data.tags['hpsweep.worker_pid']}", []).append(r)
    busy = sum(len(rs) * REPORTS * SLEEP for rs in per_worker.values())
    spans = sum((max(r.info.end_time for r in rs) - min(r.info.start_time for r in rs)) / 1000
                for rs in per_worker.values())
    first = min(r.info.start_time for r in runs) / 1000
    last = max(r.info.end_time for r in runs) / 1000
    slots = NODES * CPUS
    print(f"\n{CELLS} cells of {REPORTS * SLEEP:.0f}s on {slots} slots: wall {wall:.0f}s, runs' span "
          f"{last - first:.0f}s, utilisation over the span {busy / (slots * (last - first)):.2f}, "
          f"in the workers once up {busy / spans:.2f} ({len(per_worker)} workers on {nodes_used} nodes); load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    assert busy / spans >= 0.8, f"slots busy {busy / spans:.2f} of the time once their workers were up"
