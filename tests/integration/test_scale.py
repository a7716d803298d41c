"""A 10^4-cell sweep of instant trials (issue 11), run as a user would (`hpsweep run`, in-process
Ray, a real `mlflow server`, local storage): it runs to the end with one FINISHED run per cell
and one lease record per cell, in bundles, so that Ray Tune makes far fewer trials than cells.
The wall time is printed, never asserted.

About ten minutes on a 2-core machine: a long run, so ``make test-scale`` runs it, not
``make test`` (whose tiers, with the container tier, must fit CI's 45 minutes)."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient
from test_engine import cli_env, run_cli, sweep_file

pytestmark = [pytest.mark.slow, pytest.mark.scale]

N = 10_000


def _all_runs(uri: str, experiment_id: str) -> list:
    client, runs, token = MlflowClient(uri), [], None
    while True:
        page = client.search_runs([experiment_id], "tags.`hpsweep.role` = 'cell'", max_results=5000,
                                  page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def test_ten_thousand_instant_cells_each_one_finished_run(tmp_path, mlflow_server, moto_server) -> None:
    path, name = sweep_file(tmp_path, f"""
        config: {{reports: 1, sleep: 0.0}}
        parameters:
          x: {{range: [0, {N - 1}]}}
        checkpoint: {{every: 1}}
    """)
    storage = tmp_path / "storage"
    t0 = time.perf_counter()
    out = run_cli(["run", str(path), "--tracking-uri", mlflow_server.url, "--storage", str(storage),
                   "--no-live"], cli_env(tmp_path, moto_server), tmp_path, timeout=2400)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"{N} cells finished, 0 failed, 0 already done, 0 finished elsewhere, 0 interrupted" in out.stdout, out.stdout[-2000:]

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name(name)
    runs = _all_runs(mlflow_server.url, exp.experiment_id)
    by_cell: dict[str, list[str]] = {}
    for r in runs:
        by_cell.setdefault(r.data.tags["hpsweep.cell_id"], []).append(r.info.status)
    assert len(by_cell) == N, f"{len(by_cell)} cells have runs"
    assert all(v == ["FINISHED"] for v in by_cell.values()), \
        {c: v for c, v in by_cell.items() if v != ["FINISHED"]}
    xs = sorted(int(float(r.data.params["x"])) for r in runs)
    assert xs == list(range(N))                       # every grid point, once
    assert all(r.data.metrics.get("loss") is not None for r in runs)
    leases = list((storage / "leases").glob("*.json"))
    assert len(leases) == N and all('"done"' in f.read_text() for f in leases[:200])
    checkpoints = list((storage / name / "cells").glob("*/*checkpoint.pt"))
    assert len(checkpoints) == N
    trials = [d for d in next((storage / name).glob("tune-*")).iterdir() if d.is_dir()]
    assert len(trials) < N / 20, f"{len(trials)} Tune trials for {N} cells: bundles not used"
    print(f"\n{N} instant cells: {wall:.0f}s wall ({wall / N * 1e3:.1f} ms a cell), {len(trials)} Tune trials; "
          + next(line for line in out.stdout.splitlines() if "cells finished" in line))
