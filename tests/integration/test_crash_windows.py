"""Crash windows at a cell's end (issue 14, item 6), with real parts: Ray, a real `mlflow server`,
a local storage folder, the `sleep` trainer.

The tracker's test hook (``HPSWEEP_TEST_PAUSE_AT``, see ``CellTracker._test_pause``) stops a
cell's ``finish`` at a named point between its writes (metrics sent / checkpoint written /
before the run is set FINISHED); the test then delivers SIGINT to the driver or SIGKILL to the
worker there, reruns the sweep, and checks the outcome: one FINISHED run per cell, every
metric's history holding each step exactly once, no finished cell run again, and each cell's
final checkpoint in storage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_engine import HPSWEEP, child_runs, cli_env, run_cli, sweep_file

from hpsweep.store.checkpoints import stored_checkpoint
from hpsweep.store.storage import open_storage

pytestmark = pytest.mark.slow

REPORTS = 4
POINTS = ("metrics_sent", "checkpoint_written", "before_terminated")
BODY = f"""
    config: {{reports: {REPORTS}, sleep: 0.1}}
    parameters:
      x: {{grid: [0.0, 1.0]}}
    seeds: 1
    resources: {{cpus: 1}}
    checkpoint: {{every: 1}}
"""


def wait_for_marker(folder: Path, proc: subprocess.Popen, timeout: float = 240) -> Path | None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for marker in folder.iterdir():
            if not marker.name.startswith(".") and marker.read_text().strip():
                return marker
        time.sleep(0.05)
    return None


def check_outcome(uri: str, name: str, storage: Path, finished_before: dict) -> None:
    client = MlflowClient(uri)
    by_cell: dict[str, list] = {}
    for run in child_runs(uri, name):
        by_cell.setdefault(run.data.tags["hpsweep.cell_id"], []).append(run)
    assert len(by_cell) == 2
    assert all(len(rs) == 1 and rs[0].info.status == "FINISHED" for rs in by_cell.values()), \
        {c: [r.info.status for r in rs] for c, rs in by_cell.items()}
    for cell, (run_id, end_time, attempts) in finished_before.items():  # never run again
        run = by_cell[cell][0]
        assert (run.info.run_id, run.info.end_time, run.data.tags["hpsweep.attempts"]) == \
            (run_id, end_time, attempts)
    for cell, (run,) in by_cell.items():
        for key in ("loss", "score"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, REPORTS + 1)), (cell, key, steps)
        stored = stored_checkpoint(open_storage(str(storage)), name, cell)
        assert stored is not None and stored[1]["step"] == REPORTS, f"no final checkpoint for {cell}"


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("how", ["sigint-driver", "sigkill-worker"])
def test_signal_at_a_cell_end_then_rerun(tmp_path, mlflow_server, moto_server, point, how) -> None:
    path, name = sweep_file(tmp_path, BODY)
    env = cli_env(tmp_path, moto_server)
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    # a short lease: the retried trial of a killed worker takes its cell over within seconds
    env.update(HPSWEEP_TEST_PAUSE_AT=point, HPSWEEP_TEST_PAUSE_DIR=str(pauses), HPSWEEP_TEST_PAUSE_S="10",
               HPSWEEP_LEASE_TTL="6")
    storage = tmp_path / "storage"
    args = ["run", str(path), "--tracking-uri", mlflow_server.url, "--storage", str(storage), "--no-live"]
    proc = subprocess.Popen([HPSWEEP, *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        marker = wait_for_marker(pauses, proc)
        assert marker is not None, f"no cell reached {point}:\n" + (proc.stdout.read() if proc.poll() is not None else "")
        if how == "sigint-driver":
            proc.send_signal(signal.SIGINT)
        else:
            os.kill(int(marker.read_text()), signal.SIGKILL)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = child_runs(mlflow_server.url, name)
    assert not [r for r in first if r.info.status == "RUNNING"], out
    finished_before = {r.data.tags["hpsweep.cell_id"]: (r.info.run_id, r.info.end_time, r.data.tags["hpsweep.attempts"])
                       for r in first if r.info.status == "FINISHED"}
    del env["HPSWEEP_TEST_PAUSE_AT"]
    again = run_cli(args, env, tmp_path)
    assert again.returncode == 0, out + again.stdout + again.stderr
    check_outcome(mlflow_server.url, name, storage, finished_before)


def test_a_cell_done_before_the_first_flush_keeps_its_checkpoint(tmp_path, mlflow_server, moto_server) -> None:
    """A cell that ends before the tracker's first flush (about a second) still leaves its final
    checkpoint in storage."""
    path, name = sweep_file(tmp_path, """
        config: {reports: 1, sleep: 0.0}
        parameters:
          x: {grid: [0.0, 1.0]}
        seeds: 1
        checkpoint: {every: 1}
    """)
    env = cli_env(tmp_path, moto_server)
    storage = tmp_path / "storage"
    proc = run_cli(["run", str(path), "--tracking-uri", mlflow_server.url, "--storage", str(storage),
                    "--no-live"], env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cells = {r.data.tags["hpsweep.cell_id"] for r in child_runs(mlflow_server.url, name)}
    assert len(cells) == 2
    assert {p.parent.name for p in (storage / name / "cells").glob("*/*checkpoint.pt")} == cells
