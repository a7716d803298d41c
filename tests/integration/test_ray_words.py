"""hpsweep's words, not Ray's, on the user's terminal (issue 22's "Ray's words where hpsweep's
belong", issue 25): a SIGTERM (``timeout``, ``hpsweep stop``, a stopped Ray job) ends an
in-process sweep as Ctrl-C does, without Ray's failure-signal stack dump (``*** SIGTERM received
... PC: @``), Tune's ``Resume experiment with: Tuner.restore(...)`` or Ray's "SIGTERM handler
is not set" notice; the runs it leaves are KILLED, never RUNNING. Real parts: in-process Ray,
a real ``mlflow server``, the ``sleep`` trainer."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient
from test_engine import HPSWEEP, child_runs, cli_env, sweep_file

pytestmark = pytest.mark.slow

RAYS_WORDS = ("SIGTERM received", "PC: @", "Resume experiment", "Tuner.restore", "SIGTERM handler",
              "Stop signal received", "Trials did not complete", "No trial is running", "Traceback")


def test_sigterm_ends_a_sweep_in_hpsweeps_words(tmp_path, mlflow_server, moto_server) -> None:
    path, name = sweep_file(tmp_path, """
        config: {reports: 40, sleep: 0.5}
        parameters:
          x: {grid: [0.0, 1.0]}
        resources: {cpus: 1}
    """)
    args = ["run", str(path), "--tracking-uri", mlflow_server.url, "--storage", str(tmp_path / "st"), "--no-live"]
    proc = subprocess.Popen([HPSWEEP, *args], env=cli_env(tmp_path, moto_server), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(mlflow_server.url)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # a cell is training: a loss logged
        try:
            runs = child_runs(mlflow_server.url, name)
        except AssertionError:
            runs = []
        if any(client.get_metric_history(r.info.run_id, "loss") for r in runs):
            break
        time.sleep(0.3)
    assert proc.poll() is None, "the sweep ended before the signal:\n" + proc.stdout.read() + proc.stderr.read()
    proc.send_signal(signal.SIGTERM)  # what `timeout` sends the command it runs
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "interrupted: run the same command again to resume the 2 unfinished cells" in out
    assert not [w for w in RAYS_WORDS if w in out + err], out + err
    exp = client.get_experiment_by_name(name)
    parent = client.search_runs([exp.experiment_id], "tags.`hpsweep.role` = 'sweep'")[0]
    assert parent.info.status == "KILLED"
    assert {r.info.status for r in child_runs(mlflow_server.url, name)} == {"KILLED"}
