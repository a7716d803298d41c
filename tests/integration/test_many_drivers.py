"""Several drivers on one sweep at once (`hpsweep run` subprocesses, each with its own
in-process Ray; a real `mlflow server`; local or S3 storage on moto_server): cell leases keep
every cell to one start, one FINISHED run, whoever runs it and whatever dies.

The sleep trainer appends to a file per cell (``starts_dir``) each time it starts: that file is
the ground truth of how many times a cell ran, independent of MLflow and of the leases.
Timings are printed (the 3-driver wall against one driver's), never asserted.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_engine import HPSWEEP, child_runs, cli_env, sweep_file

from hpsweep.spec.model import load_spec
from hpsweep.spec.plan import plan
from hpsweep.store.mlflow import TAG
from hpsweep.store.storage import open_storage

pytestmark = pytest.mark.slow

TTL = "6"  # seconds a lease lives unrenewed: short, so that a killed driver's cells move on soon


def grid_sweep(tmp_path: Path, starts: Path, xs: list[float], name: str | None = None,
               sleep: float = 0.5) -> tuple[Path, str]:
    return sweep_file(tmp_path, f"""
        config: {{reports: 3, sleep: {sleep}, starts_dir: "{starts}"}}
        parameters:
          x: {{grid: {xs}}}
        seeds: 2
        checkpoint: {{every: 1}}
    """, name=name)


def start_drivers(n: int, args_list: list[list[str]], tmp_path: Path, moto_server,
                  extra_env: dict | None = None) -> list[subprocess.Popen]:
    """``n`` drivers started back to back (within 100 ms), each a process group of its own."""
    envs = []
    for _ in range(n):
        env = cli_env(tmp_path, moto_server)  # its own Ray temp dir
        env.update({"HPSWEEP_LEASE_TTL": TTL, **(extra_env or {})})
        envs.append(env)
    procs, t0 = [], time.perf_counter()
    for args, env in zip(args_list, envs):
        procs.append(subprocess.Popen([HPSWEEP, *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    spread = time.perf_counter() - t0
    assert spread < 0.1, f"drivers started {spread:.3f}s apart"
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            text, _ = p.communicate()
        out.append((p.returncode, text))
    return out


def starts(starts_dir: Path) -> dict[str, list[int]]:
    """cell file -> the step each start began from."""
    return {f.name: [int(line) for line in f.read_text().split()] for f in starts_dir.iterdir()}


def assert_one_finished_run_per_cell(uri: str, name: str, cells: int, storage: str | None = None,
                                     endpoint: str | None = None) -> list:
    """... and, given the storage, that the sweep's finished index marks exactly those cells
    (whichever driver or trial finished them, or copied them in from another sweep)."""
    runs = child_runs(uri, name)
    by_cell: dict[str, list] = {}
    for r in runs:
        by_cell.setdefault(r.data.tags["hpsweep.cell_id"], []).append(r)
    assert len(by_cell) == cells, f"{len(by_cell)} cells have runs, expected {cells}"
    bad = {c: [r.info.status for r in rs] for c, rs in by_cell.items()
           if len(rs) != 1 or rs[0].info.status != "FINISHED"}
    assert not bad, bad
    parent = MlflowClient(uri).search_runs([runs[0].info.experiment_id], "tags.`hpsweep.role` = 'sweep'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED", [p.info.status for p in parent]
    if storage:
        key, _, where = MlflowClient(uri).get_experiment_by_name(name).tags[TAG["index"]].partition(" ")
        store = open_storage(storage, endpoint)
        assert where == store.uri and store.finished_marks(key) == set(by_cell)
    return runs


def assert_no_duplicated_step(uri: str, runs: list) -> None:
    client = MlflowClient(uri)
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert sorted(steps) == [1, 2, 3], (r.data.tags["hpsweep.cell_id"], steps)


def one_driver_wall(tmp_path: Path, mlflow_server, moto_server, storage: str) -> float:
    """The same 24 cells run by one driver (its own storage and sweep name): the baseline."""
    path, _ = grid_sweep(tmp_path, tmp_path / "starts-one", [float(i) for i in range(12)])
    t0 = time.perf_counter()
    [(rc, out)] = finish(start_drivers(1, [["run", str(path), "--tracking-uri", mlflow_server.url,
                                            "--storage", storage, "--no-live"]], tmp_path, moto_server))
    assert rc == 0, out
    return time.perf_counter() - t0


def _three_drivers(tmp_path, mlflow_server, moto_server, storage: str, baseline_storage: str) -> None:
    starts_dir = tmp_path / "starts"
    path, name = grid_sweep(tmp_path, starts_dir, [float(i) for i in range(12)])
    args = ["run", str(path), "--tracking-uri", mlflow_server.url, "--storage", storage, "--no-live"]
    t0 = time.perf_counter()
    results = finish(start_drivers(3, [args] * 3, tmp_path, moto_server))
    wall3 = time.perf_counter() - t0
    for rc, out in results:
        assert rc == 0, out
    counted = starts(starts_dir)
    assert len(counted) == 24 and all(v == [0] for v in counted.values()), counted
    runs = assert_one_finished_run_per_cell(mlflow_server.url, name, 24, storage, moto_server.url)
    assert_no_duplicated_step(mlflow_server.url, runs)
    assert all(r.data.tags["hpsweep.attempts"] == "1" for r in runs)
    ran_by = [int(re.search(r"(\d+) cells finished, ", out).group(1)) for _, out in results]
    assert sum(ran_by) == 24, ran_by
    for _, out in results:
        print([line for line in out.splitlines() if " cells finished, " in line])
    wall1 = one_driver_wall(tmp_path, mlflow_server, moto_server, baseline_storage)
    print(f"\n3 drivers: {wall3:.1f}s wall, cells run per driver {ran_by}; one driver: {wall1:.1f}s; "
          f"ratio {wall3 / wall1:.2f}")


def test_three_drivers_local_storage_each_cell_once(tmp_path, mlflow_server, moto_server) -> None:
    _three_drivers(tmp_path, mlflow_server, moto_server, str(tmp_path / "storage"),
                   str(tmp_path / "storage-one"))


def test_three_drivers_s3_storage_each_cell_once(tmp_path, mlflow_server, moto_server, aws_env) -> None:
    bucket = moto_server.create_bucket()
    _three_drivers(tmp_path, mlflow_server, moto_server, f"s3://{bucket}/sweeps", f"s3://{bucket}/one")
    assert any(k.startswith("sweeps/leases/") for k in moto_server.keys(bucket, "sweeps/"))


def test_a_killed_driver_cells_are_taken_over_after_the_lease_expires(tmp_path, mlflow_server,
                                                                      moto_server) -> None:
    starts_dir = tmp_path / "starts"
    path, name = grid_sweep(tmp_path, starts_dir, [float(i) for i in range(12)], sleep=1.5)
    storage = str(tmp_path / "storage")
    args = ["run", str(path), "--tracking-uri", mlflow_server.url, "--storage", storage, "--no-live"]
    procs = start_drivers(3, [args] * 3, tmp_path, moto_server)
    victim = procs[0]
    files = {c.id: f"x={c.params['x']},seed={c.seed}" for c in plan(load_spec(str(path)))}
    # wait until the victim trains a cell (its lease names it; the cell's start is counted)
    deadline, held, leases = time.time() + 300, None, Path(storage) / "leases"
    while time.time() < deadline and held is None:
        for f in leases.glob("*.json") if leases.is_dir() else []:
            text = f.read_text()
            if f":{victim.pid}:" in text and '"held"' in text and (starts_dir / files[f.stem]).exists():
                held = f.stem
        time.sleep(0.2)
    assert held, "the victim never trained a cell"
    time.sleep(3.0)  # a report in (at 1.5 s), and its checkpoint sent (within 1 s); not done (4.5 s)
    os.killpg(victim.pid, signal.SIGKILL)  # the driver and its Ray: as if its machine died
    victim.wait()
    # what the victim held when it died, and which of those it had started training
    orphans = [f.stem for f in leases.glob("*.json")
               if f":{victim.pid}:" in f.read_text() and '"held"' in f.read_text()]
    trained = {c: len(starts(starts_dir).get(files[c], [])) for c in orphans}
    assert any(trained.values()), f"the victim died holding no cell it trained: {trained}"
    results = finish(procs[1:])
    for rc, out in results:
        assert rc == 0, out
    runs = assert_one_finished_run_per_cell(mlflow_server.url, name, 24, storage)
    assert_no_duplicated_step(mlflow_server.url, runs)
    counted = starts(starts_dir)
    assert len(counted) == 24
    resumed = {c: v for c, v in counted.items() if len(v) > 1}
    print(f"\ncells started twice (the killed driver's, then a takeover): {resumed}")
    for cell, n in trained.items():  # each orphan ran once more, resumed by another driver
        assert len(counted[files[cell]]) == n + 1, (cell, n, counted[files[cell]])
    assert all(len(v) == 2 for v in resumed.values()), resumed
    assert any(v[1] > 0 for v in resumed.values()), f"no takeover resumed from a checkpoint: {resumed}"


def test_overlapping_sweeps_run_shared_cells_once(tmp_path, mlflow_server, moto_server) -> None:
    starts_dir = tmp_path / "starts"
    a, name_a = grid_sweep(tmp_path, starts_dir, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    b, name_b = grid_sweep(tmp_path, starts_dir, [3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    storage = str(tmp_path / "storage")  # one root: the leases of shared cells are shared
    common = ["--tracking-uri", mlflow_server.url, "--storage", storage, "--no-live"]
    results = finish(start_drivers(2, [["run", str(a), *common], ["run", str(b), *common]],
                                   tmp_path, moto_server))
    for rc, out in results:
        assert rc == 0, out
    counted = starts(starts_dir)
    assert len(counted) == 18 and all(v == [0] for v in counted.values()), counted
    runs_a = assert_one_finished_run_per_cell(mlflow_server.url, name_a, 12, storage)
    runs_b = assert_one_finished_run_per_cell(mlflow_server.url, name_b, 12, storage)
    copied = [r for r in runs_a + runs_b if "hpsweep.copied_from" in r.data.tags]
    assert len(copied) == 6, [r.data.tags.get("hpsweep.copied_from") for r in runs_a + runs_b]
    assert_no_duplicated_step(mlflow_server.url, runs_a + runs_b)
    shared = {r.data.tags["hpsweep.cell_id"]: r.data.metrics["loss"] for r in runs_a}
    for r in runs_b:
        if r.data.tags["hpsweep.cell_id"] in shared:
            assert r.data.metrics["loss"] == shared[r.data.tags["hpsweep.cell_id"]]


def test_two_first_runs_in_a_fresh_directory_both_succeed(tmp_path, moto_server) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    starts_dir = tmp_path / "starts"
    path, name = grid_sweep(fresh, starts_dir, [0.0, 1.0, 2.0], sleep=0.1)
    env_clean = {"MLFLOW_TRACKING_URI": "", "HPSWEEP_STORAGE": ""}
    results = finish(start_drivers(2, [["run", str(path), "--no-live"]] * 2, fresh, moto_server,
                                   extra_env=env_clean))
    for rc, out in results:
        assert rc == 0, out
    db = fresh / ".hpsweep" / "mlflow.db"
    tables = [r[0] for r in sqlite3.connect(db).execute("select name from sqlite_master where type='table'")]
    assert not [t for t in tables if t.startswith("_alembic_tmp")], tables
    counted = starts(starts_dir)
    assert len(counted) == 6 and all(v == [0] for v in counted.values()), counted
    assert_one_finished_run_per_cell(f"sqlite:///{db}", name, 6)
