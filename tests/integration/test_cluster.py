"""A sweep submitted with ``hpsweep submit`` to a real two-node Ray cluster on loopback.

The cluster (head + a second node with a resource only it has), the MLflow server (S3 artifacts
on moto) and moto itself are real processes from ``conftest.py``. The job runs
``hpsweep run --address auto`` on the cluster; these tests read the outcome back where a user
would: MLflow runs (node ids the trials ran on, metric steps) and the S3 bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HPSWEEP = str(Path(sys.executable).with_name("hpsweep"))


def _working_dir(tmp_path: Path, sweep: dict) -> Path:
    """What a user ships: the project's code and the sweep file, nothing else."""
    wd = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("hpsweep", "trainers"):
        shutil.copytree(REPO / package, wd / package, ignore=ignore)
    (wd / "sweeps").mkdir()
    (wd / "sweeps" / f"{sweep['name']}.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    return wd


def _hpsweep(cluster, *args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    # as a user's shell: the cluster's token in ~/.ray/auth_token, RAY_AUTH_MODE not set
    env = {**os.environ, **cluster.env}
    env.pop("RAY_AUTH_MODE")
    return subprocess.run([HPSWEEP, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _submit(cluster, wd: Path, name: str, mlflow_server, moto_server, bucket: str) -> str:
    out = _hpsweep(
        cluster, "submit", f"sweeps/{name}.yaml",
        "--address", cluster.dashboard_url,
        "--tracking-uri", mlflow_server.url,
        "--storage", f"s3://{bucket}/ckpt",
        "--s3-endpoint", moto_server.url,
        cwd=wd, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().splitlines()[-1]
    assert job_id.startswith(f"hpsweep-{name}-"), out.stdout
    return job_id


def _nodes(cluster) -> dict[str, dict[str, float]]:
    """Node id -> total resources, of the cluster's live nodes."""
    code = (
        f"import json, ray; ray.init(address={cluster.gcs_address!r}, logging_level='ERROR'); "
        "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **cluster.env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cell_runs(tracking_uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} on the tracking server"
    runs = client.search_runs([exp.experiment_id], "tags.`hpsweep.role` = 'cell'", max_results=1000)
    return client, exp, runs


def _sleep_sweep(name: str, xs: list[float], reports: int, sleep: float, gpus: float = 0) -> dict:
    return {
        "name": name,
        "trainer": "sleep",
        "config": {"reports": reports, "sleep": sleep},
        "parameters": {"x": {"grid": xs}},
        "seeds": 1,
        "metric": {"name": "loss", "mode": "min"},
        "resources": {"cpus": 1, "gpus": gpus},
        "checkpoint": {"every": 1},
    }


def test_submitted_sweep_spreads_over_both_nodes(ray_cluster, mlflow_server, moto_server, tmp_path):
    name = "cluster-spread"
    sweep = _sleep_sweep(name, [0.0, 0.25, 0.5, 0.75, 1.0, 1.25], reports=3, sleep=1.0)
    wd = _working_dir(tmp_path, sweep)
    bucket = moto_server.create_bucket()

    job_id = _submit(ray_cluster, wd, name, mlflow_server, moto_server, bucket)

    # `hpsweep logs --follow` streams until the job ends, and exits 0 only if it succeeded
    logs = _hpsweep(ray_cluster, "logs", job_id, "--follow", "--address", ray_cluster.dashboard_url,
                    cwd=wd, timeout=300)
    assert logs.returncode == 0, logs.stdout[-4000:] + logs.stderr[-2000:]
    status = _hpsweep(ray_cluster, "status", "--address", ray_cluster.dashboard_url, job_id, cwd=wd)
    assert status.returncode == 0, status.stderr
    assert "SUCCEEDED" in status.stdout

    # every cell ran once, to the end, and the trials ran on both nodes of the cluster
    client, exp, runs = _cell_runs(mlflow_server.url, name)
    assert len(runs) == 6
    assert {r.info.status for r in runs} == {"FINISHED"}
    used = {r.data.tags["hpsweep.node_id"] for r in runs}
    assert used == set(_nodes(ray_cluster)), used
    assert len(used) == 2

    # checkpoints went to the S3 storage, artifacts through the tracking server into its bucket
    ckpt = moto_server.keys(bucket, "ckpt/")
    assert sum(k.endswith("checkpoint.pt") for k in ckpt) == 6, ckpt
    artifacts = moto_server.keys(mlflow_server.bucket, f"{mlflow_server.prefix}/{exp.experiment_id}/")
    assert any(k.endswith("sweep.yaml") for k in artifacts), artifacts

    # the job list shows it, with its sweep
    table = _hpsweep(ray_cluster, "status", "--address", ray_cluster.dashboard_url, cwd=wd)
    assert table.returncode == 0
    assert any(job_id in line and name in line for line in table.stdout.splitlines())


def test_fractional_gpu_trials_share_the_gpu_node(ray_cluster, mlflow_server, moto_server, tmp_path):
    name = "cluster-gpu-share"
    sweep = _sleep_sweep(name, [0.0, 0.5, 1.0, 1.5], reports=6, sleep=1.0, gpus=0.5)
    wd = _working_dir(tmp_path, sweep)
    bucket = moto_server.create_bucket()

    job_id = _submit(ray_cluster, wd, name, mlflow_server, moto_server, bucket)
    logs = _hpsweep(ray_cluster, "logs", job_id, "--follow", "--address", ray_cluster.dashboard_url,
                    cwd=wd, timeout=300)
    assert logs.returncode == 0, logs.stdout[-4000:] + logs.stderr[-2000:]

    (gpu_node,) = [n for n, res in _nodes(ray_cluster).items() if res.get("GPU", 0) > 0]
    client, exp, runs = _cell_runs(mlflow_server.url, name)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    # only the node with a GPU ran them, two at a time on its one GPU (0.5 each), never more
    assert {r.data.tags["hpsweep.node_id"] for r in runs} == {gpu_node}
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most == 2, f"{most} trials ran at once on one GPU at 0.5 GPU each"


def _checkpointed_step(moto_server, bucket: str, key: str) -> int:
    from hpsweep.trainer.checkpoint import load_state

    body = moto_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return int(load_state(body, "cpu")["step"])


def test_stopped_sweep_resumes_from_s3_checkpoints(ray_cluster, mlflow_server, moto_server, tmp_path):
    name = "cluster-resume"
    reports = 30
    sweep = _sleep_sweep(name, [0.0, 0.5, 1.0, 1.5], reports=reports, sleep=0.5)
    wd = _working_dir(tmp_path, sweep)
    bucket = moto_server.create_bucket()

    job_id = _submit(ray_cluster, wd, name, mlflow_server, moto_server, bucket)
    # stop the sweep as soon as cells have checkpointed, long before any can finish
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if sum(k.endswith("checkpoint.pt") for k in moto_server.keys(bucket, "ckpt/")) >= 2:
            break
        time.sleep(0.25)
    else:
        pytest.fail("the cells never checkpointed to S3")
    stopped = _hpsweep(ray_cluster, "stop", job_id, "--address", ray_cluster.dashboard_url, cwd=wd)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.split() == [job_id, "STOPPED"]

    client, exp, runs = _cell_runs(mlflow_server.url, name)
    unfinished = {r.data.tags["hpsweep.cell_id"] for r in runs if r.info.status != "FINISHED"}
    saved = {k.split("/")[-2]: k for k in moto_server.keys(bucket, "ckpt/") if k.endswith("checkpoint.pt")}
    interrupted = {cell: _checkpointed_step(moto_server, bucket, saved[cell])
                   for cell in unfinished & set(saved)}
    assert interrupted, f"no cell was stopped mid-way with a checkpoint: {saved}, {unfinished}"
    assert all(0 < step < reports for step in interrupted.values()), interrupted

    # the same command again: interrupted cells pick up from their S3 checkpoints
    resubmitted_ms = time.time() * 1000
    job2 = _submit(ray_cluster, wd, name, mlflow_server, moto_server, bucket)
    logs = _hpsweep(ray_cluster, "logs", job2, "--follow", "--address", ray_cluster.dashboard_url,
                    cwd=wd, timeout=300)
    assert logs.returncode == 0, logs.stdout[-4000:] + logs.stderr[-2000:]

    client, exp, runs = _cell_runs(mlflow_server.url, name)
    by_cell: dict[str, list] = {}
    for r in runs:
        by_cell.setdefault(r.data.tags["hpsweep.cell_id"], []).append(r)
    assert len(by_cell) == 4
    for cell, cell_runs in by_cell.items():
        assert [r.info.status for r in cell_runs].count("FINISHED") == 1, cell
        history = [m for r in cell_runs for m in client.get_metric_history(r.info.run_id, "loss")]
        assert max(m.step for m in history) == reports
        if cell in interrupted:
            # the second job went on from the checkpoint (state {"step": k} -> next report k+1),
            # not from step 1, and then reported every remaining step once
            resumed = sorted(m.step for m in history if m.timestamp >= resubmitted_ms)
            assert resumed[0] >= interrupted[cell] + 1 > 1, (cell, resumed[:3], interrupted[cell])
            assert resumed == list(range(resumed[0], reports + 1))
