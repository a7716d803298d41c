"""The engine end to end, with real parts: Ray, a real `mlflow server`, S3 on moto_server.

Sweeps use the `sleep` trainer, whose loss is a known function of its parameters, so the
right answer is known in advance and the tests stay fast.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

HPSWEEP = str(Path(sys.executable).with_name("hpsweep"))


def sweep_file(tmp_path: Path, body: str, name: str | None = None) -> tuple[Path, str]:
    name = name or f"t-{secrets.token_hex(4)}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\ntrainer: sleep\nmetric: {{name: loss, mode: min}}\n" + textwrap.dedent(body))
    return path, name


def cli_env(tmp_path: Path, moto_server) -> dict[str, str]:
    """A hermetic environment for one `hpsweep` process: its own Ray temp dir and token."""
    env = {**os.environ, **moto_server.env, "MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    ray_tmp = Path("/tmp") / f"hpe{secrets.token_hex(3)}"  # Ray's socket paths must stay short
    ray_tmp.mkdir()
    env["RAY_TMPDIR"] = str(ray_tmp)
    return env


def child_runs(uri: str, sweep: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(sweep)
    assert exp is not None, f"no experiment {sweep!r}"
    return client.search_runs([exp.experiment_id], "tags.`hpsweep.role` = 'cell'", max_results=1000)


def run_cli(args: list[str], env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([HPSWEEP, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_end_to_end_mlflow_server_and_s3(tmp_path, mlflow_server, moto_server) -> None:
    bucket = moto_server.create_bucket()
    path, name = sweep_file(tmp_path, """
        config: {reports: 3, sleep: 0.05, extra_metrics: 2}
        parameters:
          x: {grid: [0.0, 1.0, 2.0]}
        seeds: 2
        checkpoint: {every: 1}
    """)
    env = cli_env(tmp_path, moto_server)
    proc = run_cli(["run", str(path), "--tracking-uri", mlflow_server.url,
                    "--storage", f"s3://{bucket}/sweeps", "--no-live"], env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = child_runs(mlflow_server.url, name)
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    client = MlflowClient(mlflow_server.url)
    cells = set()
    for run in runs:
        tags, params = run.data.tags, run.data.params
        cells.add(tags["hpsweep.cell_id"])
        assert tags["mlflow.parentRunId"] and tags["hpsweep.sweep"] == name
        swept = json.loads(tags["hpsweep.params"])
        assert float(params["x"]) == swept["x"] and params["seed"] == tags["hpsweep.seed"]
        assert params["reports"] == "3" and params["extra_metrics"] == "2"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
        wobble = ((int(tags["hpsweep.seed"]) * 7919) % 100) / 1000.0
        assert history[-1].value == pytest.approx(swept["x"] ** 2 + 1 / 3 + wobble)
        assert {"extra/0", "extra/1", "score"} <= set(run.data.metrics)
    keys = moto_server.keys(bucket, f"sweeps/{name}/cells/")
    assert {k.split("/")[3] for k in keys if k.endswith("checkpoint.pt")} == cells
    # The results table and the UI hint were printed.
    assert "mean" in proc.stdout and f"{mlflow_server.url}/#/experiments/" in proc.stdout
    # status shows the completeness matrix
    status = run_cli(["status", str(path), "--tracking-uri", mlflow_server.url], env, tmp_path)
    assert status.returncode == 0 and "done 6" in status.stdout, status.stdout + status.stderr


def test_sigint_then_rerun_runs_each_cell_exactly_once(tmp_path, mlflow_server, moto_server) -> None:
    path, name = sweep_file(tmp_path, """
        config: {reports: 8, sleep: 0.4}
        parameters:
          x: {grid: [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]}
        seeds: 1
        resources: {cpus: 1}
    """)
    env = cli_env(tmp_path, moto_server)
    storage = str(tmp_path / "storage")
    args = ["run", str(path), "--tracking-uri", mlflow_server.url, "--storage", storage, "--no-live"]
    proc = subprocess.Popen([HPSWEEP, *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    client = MlflowClient(mlflow_server.url)
    while time.time() < deadline and proc.poll() is None:
        try:
            runs = child_runs(mlflow_server.url, name)
        except AssertionError:
            runs = []
        finished = [r for r in runs if r.info.status == "FINISHED"]
        # interrupt once two cells are done and a running one is a few checkpoints in
        running = [r for r in runs if r.info.status == "RUNNING"
                   and len(client.get_metric_history(r.info.run_id, "loss")) >= 3]
        if len(finished) >= 2 and running:
            break
        time.sleep(0.3)
    assert proc.poll() is None, "the sweep ended before it could be interrupted:\n" + proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted" in out
    after_interrupt = child_runs(mlflow_server.url, name)
    assert not [r for r in after_interrupt if r.info.status == "RUNNING"], "RUNNING orphans after Ctrl-C"
    finished = {r.data.tags["hpsweep.cell_id"]: (r.info.run_id, r.info.end_time)
                for r in after_interrupt if r.info.status == "FINISHED"}
    killed = [r for r in after_interrupt if r.info.status == "KILLED"]
    assert 2 <= len(finished) < 6 and killed
    before = {r.info.run_id: [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
              for r in killed}

    again = run_cli(args, env, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    runs = child_runs(mlflow_server.url, name)
    by_cell: dict[str, list] = {}
    for r in runs:
        by_cell.setdefault(r.data.tags["hpsweep.cell_id"], []).append(r)
    assert len(by_cell) == 6
    assert all(len(rs) == 1 and rs[0].info.status == "FINISHED" for rs in by_cell.values()), \
        {c: [r.info.status for r in rs] for c, rs in by_cell.items()}
    for cell, (run_id, end_time) in finished.items():  # not re-run
        assert by_cell[cell][0].info.run_id == run_id and by_cell[cell][0].info.end_time == end_time
        assert by_cell[cell][0].data.tags["hpsweep.attempts"] == "1"
    resumed_from_checkpoint = 0
    for run in killed:  # a run of its own for the second attempt, continuing the first one's history
        resumed = by_cell[run.data.tags["hpsweep.cell_id"]][0]
        assert resumed.info.run_id != run.info.run_id
        assert resumed.data.tags["hpsweep.attempts"] == "2"
        assert client.get_run(run.info.run_id).info.lifecycle_stage == "deleted"   # superseded, out of sight
        assert client.get_run(run.info.run_id).data.tags["hpsweep.superseded_by"] == resumed.info.run_id
        if "hpsweep.continues" in resumed.data.tags:   # resumed from a checkpoint of the first attempt
            assert resumed.data.tags["hpsweep.continues"] == run.info.run_id
        steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "loss")]
        assert sorted(set(steps)) == list(range(1, 9)), steps
        if len(before[run.info.run_id]) >= 3 and steps.count(1) == 1:
            resumed_from_checkpoint += 1  # step 1 was not trained again
    assert resumed_from_checkpoint >= 1, before
    # A third run finds nothing to do.
    third = run_cli(args, env, tmp_path)
    assert third.returncode == 0 and "nothing to run" in third.stdout, third.stdout + third.stderr
