"""The Python API against the CLI on the same sweep (a real SQLite store, the sweep file in a
temporary directory outside the checkout): the same rows and numbers; CSV through pandas and
back; the client-free readers against MLflow's own client; a cell the scheduler stopped early;
reads that import neither MLflow, Ray, torch nor pandas; `hpsweep ui` started, linked, stopped."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report_support import log_sweep  # noqa: E402

pytestmark = pytest.mark.slow  # a new SQLite store migrates its schema first (~10 s)

ROOT = Path(__file__).resolve().parents[2]
SWEEP = """name: api-check
trainer: sleep
config: {sleep: 0.0}
parameters:
  x: {grid: [-1.0, 0.0, 0.5]}
  reports: {grid: [4, 8]}
seeds: 2
metric: {name: loss, mode: min}
scheduler: {type: asha, max_t: 8, grace_period: 2}
"""


def _curve(cell, upto: int | None = None) -> dict:
    n = upto or cell.params["reports"]
    loss = [(s, cell.params["x"] ** 2 + 1.0 / (s + 1) + cell.seed / 100) for s in range(1, n + 1)]
    return {"loss": loss, "score": [(s, -v) for s, v in loss]}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A sweep in the default store of a directory of its own: every cell finished but one
    failed, one never run, and one the scheduler stopped at step 2 of 8."""
    from mlflow.tracking import MlflowClient

    from hpsweep.spec.model import load_spec
    from hpsweep.spec.plan import plan

    work = tmp_path_factory.mktemp("api")
    (work / "sweep.yaml").write_text(SWEEP)
    (work / ".hpsweep").mkdir()
    uri = f"sqlite:///{work / '.hpsweep' / 'mlflow.db'}"
    cells = plan(load_spec(work / "sweep.yaml"))
    failed, pending, stopped = cells[1].id, cells[2].id, cells[3].id
    client = MlflowClient(uri)
    eid, _ = log_sweep(client, "api-check", cells, lambda c: _curve(c, 2 if c.id == stopped else None),
                       status_of=lambda c: {failed: "FAILED", pending: None}.get(c.id, "FINISHED"))
    run = client.search_runs([eid], f"tags.`hpsweep.cell_id` = '{stopped}'")[0]
    client.set_tag(run.info.run_id, "hpsweep.early_stopped", "true")
    return work, uri, {"failed": failed, "pending": pending, "stopped": stopped}


def _cli(work: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-m", "hpsweep.cli", *args], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _load(work: Path, name: str = "sweep.yaml"):
    import hpsweep

    return hpsweep.load(work / name, tracking_uri=f"sqlite:///{work / '.hpsweep' / 'mlflow.db'}")


def test_the_api_and_the_cli_give_the_same_rows_and_numbers(swept):
    import pandas as pd

    work, _, ids = swept
    sweep = _load(work)
    frame = sweep.results()
    assert len(frame) == 12 and frame["cell_id"].is_unique
    by_cell = frame.set_index("cell_id")
    assert by_cell.loc[ids["pending"], "state"] == "pending" and math.isnan(by_cell.loc[ids["pending"], "loss"])
    assert by_cell.loc[ids["failed"], "state"] == "failed"
    assert by_cell.loc[ids["stopped"], "state"] == "stopped" and by_cell.loc[ids["stopped"], "step"] == 2

    # one row per cell: the CLI's CSV read back with pandas is the API's frame, to the last bit
    csv = pd.read_csv(io.StringIO(_cli(work, "results", "sweep.yaml", "--cells", "--format", "csv").stdout))
    assert list(csv.columns) == list(frame.columns)
    pd.testing.assert_frame_equal(csv.set_index("cell_id").sort_index()[["x", "reports", "seed", "loss", "score"]],
                                  by_cell.sort_index()[["x", "reports", "seed", "loss", "score"]], check_dtype=False,
                                  check_frame_type=False)
    assert (csv.set_index("cell_id")["state"] == by_cell["state"]).all()
    # each finished cell's value is its history's last one (independent: the curve logged)
    for row in frame.itertuples():
        if row.state in ("done", "stopped"):
            assert row.loss == pytest.approx(row.x ** 2 + 1.0 / (row.step + 1) + row.seed / 100, abs=1e-12)

    # the aggregate: the CLI's JSON is the API's aggregate over seeds, group by group
    agg = json.loads(_cli(work, "results", "sweep.yaml", "--format", "json").stdout)
    api = frame.aggregate()
    assert [(g["x"], g["reports"], g["n"], g["missing"]) for g in agg] == \
        list(api[["x", "reports", "n", "missing"]].itertuples(index=False, name=None))
    for g, (_, a) in zip(agg, api.iterrows(), strict=True):
        assert g["mean"] == pytest.approx(a["mean"], rel=1e-15) if g["n"] else a["mean"] is None or math.isnan(a["mean"])
        done = frame[(frame.x == g["x"]) & (frame.reports == g["reports"]) & frame.state.isin(["done", "stopped"])]
        assert g["n"] == len(done) and (g["mean"] is None or g["mean"] == pytest.approx(done.loss.mean(), rel=1e-12))
    assert sum(g["stopped"] for g in agg) == 1
    # the table says which step each value comes from, and marks the stopped one
    table = _cli(work, "results", "sweep.yaml").stdout
    assert "step" in table and "*" in table and "stopped early" in table
    # --group-by says what it pools: the other swept parameter too, not only the seeds
    pooled = _cli(work, "results", "sweep.yaml", "--group-by", "x").stdout
    assert "over seeds and reports" in pooled and "n=4" not in pooled

    # status: the same states per cell
    rows = {r["cell_id"]: r for r in sweep.status_rows()}
    assert rows[ids["stopped"]]["state"] == "stopped" and rows[ids["pending"]]["state"] == "pending"
    status = _cli(work, "status", "sweep.yaml").stdout
    assert "done 9  stopped 1  running 0  failed 1  interrupted 0  pending 1" in status
    assert "stopped at step 2 of 8" in status

    # histories: every step once, in order, as logged
    hist = sweep.history("loss")
    assert len(hist) == sum(2 if c == ids["stopped"] else r.reports for c, r in by_cell.iterrows()
                            if r.state != "pending")
    for _, h in hist.groupby("cell_id"):
        assert list(h.step) == list(range(1, len(h) + 1))
    csv = pd.read_csv(io.StringIO(_cli(work, "history", "sweep.yaml", "loss").stdout))
    pd.testing.assert_frame_equal(csv[["cell_id", "step", "value"]], hist[["cell_id", "step", "value"]])

    listed = json.loads(_cli(work, "list", "--format", "json").stdout)
    assert listed == [{"sweep": "api-check", "experiment_id": listed[0]["experiment_id"], "cells": 11,
                       "done": 9, "stopped": 1, "running": 0, "failed": 1}]


def test_the_readers_read_what_mlflows_client_reads(swept, monkeypatch):
    import hpsweep.store.runs as runs

    work, uri, _ = swept
    fast = runs.load_sweep(uri, "api-check", histories=True)
    listed = runs.list_sweeps(uri)
    monkeypatch.setattr(runs, "reader_for", lambda uri: None)
    slow = runs.load_sweep(uri, "api-check", histories=True)
    assert runs.list_sweeps(uri) == listed and listed[0]["cells"] == 11
    assert fast.cells.keys() == slow.cells.keys() and len(fast.cells) == 11
    for cid, a in fast.cells.items():
        b = slow.cells[cid]
        assert (a.run_id, a.status, a.seed, a.params, a.config, a.metrics, a.steps, a.histories,
                a.start_time, a.end_time) == \
               (b.run_id, b.status, b.seed, b.params, b.config, b.metrics, b.steps, b.histories,
                b.start_time, b.end_time)


def test_reads_import_no_mlflow_ray_torch_or_pandas(swept):
    work, _, _ = swept
    code = ("import sys, hpsweep; s = hpsweep.load('sweep.yaml'); s.status_rows(); s.results_rows(); "
            "from hpsweep.cli import main; main(['results', 'sweep.yaml', '--format', 'csv']); "
            "main(['status', 'sweep.yaml']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'ray', 'torch', 'pandas'}))")
    out = _cli(work, "--version")  # the environment works
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_ui_starts_prints_the_sweeps_link_and_stops_on_sigterm(swept):
    sys.path.insert(0, str(Path(__file__).parent))
    from servers import free_port

    work, _, _ = swept
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "hpsweep.cli", "ui", "sweep.yaml", "--port", str(port)],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "the sweep 'api-check':" in line:
                break
        text = "".join(lines)
        assert f"MLflow UI: http://127.0.0.1:{port}" in text, text
        # printed once the server answers, not before
        assert text.index("MLflow UI:") > text.index("starting")
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read()
        link = lines[-1].split(": ", 1)[1].strip()
        assert link.startswith(f"http://127.0.0.1:{port}/#/experiments/") and "/runs?" in link
        # the job runner is off: the server's process group is the server and its worker, not
        # a dozen job consumers more
        server = subprocess.run(["pgrep", "-f", "--", f"server --backend-store-uri .* --port {port}"],
                                capture_output=True, text=True).stdout.split()
        assert len(server) == 1, server
        group = [line.split() for line in subprocess.run(["ps", "-eo", "pgid=,pid=,args="], capture_output=True,
                                                         text=True).stdout.splitlines()]
        members = [g for g in group if g[0] == server[0]]
        assert 1 <= len(members) <= 3, members
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
    assert subprocess.run(["pgrep", "-g", server[0]], capture_output=True).returncode == 1  # none left


def test_the_report_shows_the_stopped_cell_apart(swept):
    work, _, _ = swept
    _cli(work, "report", "sweep.yaml", "--out", "rep")
    md = (work / "rep" / "report.md").read_text()
    assert md.count("stopped early") == 1 and md.count("FAILED") == 1 and md.count("missing") >= 1, md


RUN = """
import asyncio, hpsweep

async def cell_of_a_notebook():
    loop = asyncio.get_running_loop()
    outcome = hpsweep.load("run.yaml").run()             # blocks, as in a notebook cell
    await asyncio.sleep(0)                                # the caller's loop still runs
    assert asyncio.get_running_loop() is loop and not loop.is_closed()
    return outcome

outcome = asyncio.run(cell_of_a_notebook())
rows = hpsweep.load("run.yaml").results_rows()
print("RESULT", outcome.finished, sorted(r["state"] for r in rows), sorted(r["step"] for r in rows))
"""


def test_run_from_python_inside_a_running_event_loop(tmp_path):
    (tmp_path / "run.yaml").write_text("name: api-run\ntrainer: sleep\nmetric: {name: loss, mode: min}\n"
                                       "config: {sleep: 0.0, reports: 3}\nparameters:\n  x: {grid: [0.0, 1.0]}\n"
                                       "resources: {cpus: 1}\n")
    ray_tmp = Path("/tmp") / f"hpa{os.getpid()}"   # Ray's socket paths must stay short
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(ray_tmp), "HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-c", RUN], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "RESULT 2 ['done', 'done'] [3, 3]" in out.stdout, out.stdout[-3000:]


TIMED = """name: {name}
trainer: sleep
config: {{sleep: 0.3, reports: 4}}
parameters:
  x: {{grid: [0.0, 1.0, 2.0]}}
metric: {{name: loss, mode: min}}
resources: {{cpus: 1}}
{extra}"""


@pytest.mark.parametrize("extra", ["", "scheduler: {type: asha, max_t: 4, grace_period: 4}\n"],
                         ids=["bundled", "a-trial-a-cell"])
def test_a_cells_duration_is_the_same_in_the_live_lines_and_in_mlflow(tmp_path, extra):
    """The live line's time of a cell is its run's duration as MLflow has it (the run's end
    minus its start), not the trial's (which includes the worker's start and the trainer's
    import): exactly for bundled cells, within the driver's hearing of the end for the rest."""
    import re

    from hpsweep.spec.plan import plan

    name = "timed-bundled" if not extra else "timed-trials"
    (tmp_path / "timed.yaml").write_text(TIMED.format(name=name, extra=extra))
    ray_tmp = Path("/tmp") / f"hpd{os.getpid()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(ray_tmp), "HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-m", "hpsweep.cli", "run", "timed.yaml", "--no-live"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    shown = {m.group(1): float(m.group(2)) for m in
             re.finditer(r"^\[\d+/3\] done\s+(.+?seed=\d+)\s.*?\s([0-9.]+)s$", out.stdout, re.M)}
    sweep = _load(tmp_path, "timed.yaml")
    labels = {c.id: c.label() for c in plan(sweep.spec)}
    mlflow = {labels[r["cell_id"]]: r["duration_s"] for r in sweep.status_rows()}
    assert set(shown) == set(mlflow) and len(shown) == 3, (out.stdout, mlflow)
    tolerance = 0.051 if not extra else 1.0   # printed to 0.1 s; the rest: Tune's word of the end
    for label, seconds in shown.items():
        assert mlflow[label] is not None and abs(seconds - mlflow[label]) <= tolerance, (label, seconds, mlflow)
