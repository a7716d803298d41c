"""Fencing (issue 22): a driver that stalls past its leases, or is cut off from the storage, writes
nothing into the cells it lost; a dead worker's cell is retried at once. Real parts: `hpsweep run`
subprocesses with their own in-process Ray, a real `mlflow server`, local storage and S3 on
moto_server, a TCP proxy on loopback between one driver and S3.

The split brain: driver A is frozen (SIGSTOP of every process of its Unix session: driver, GCS,
raylet, agents, workers) while it trains cells; B starts once A's leases have expired and takes
those cells over; A is thawed once B has advanced them. What must hold is checked on the stored
data: each cell has one run, FINISHED, whose history holds every step once and in order; the
cell's stored checkpoint is the last step's, published by that run; A exits 0 and says who took
its cells over, and the drivers' summaries count each cell once.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_engine import HPSWEEP, child_runs, cli_env, sweep_file
from test_many_drivers import finish

from hpsweep.spec.model import load_spec
from hpsweep.spec.plan import plan
from hpsweep.store.checkpoints import stored_checkpoint
from hpsweep.store.storage import open_storage
from hpsweep.trainer.checkpoint import load_state

pytestmark = pytest.mark.slow

TTL = 4
REPORTS = 12


def _sweep(tmp_path: Path, xs=(0.0, 1.0, 2.0, 3.0), reports: int = REPORTS, sleep: float = 0.5,
           retries: int = 0, starts: str = "") -> tuple[Path, str]:
    return sweep_file(tmp_path, f"""
        config: {{reports: {reports}, sleep: {sleep}, starts_dir: "{starts}"}}
        parameters:
          x: {{grid: {list(xs)}}}
        seeds: 1
        retries: {retries}
        resources: {{cpus: 1}}
        checkpoint: {{every: 1}}
    """)


def _driver(path: Path, tmp_path: Path, moto_server, uri: str, storage: str, **env) -> subprocess.Popen:
    e = {**cli_env(tmp_path, moto_server), "HPSWEEP_LEASE_TTL": str(TTL), **env}
    return subprocess.Popen([HPSWEEP, "run", str(path), "--tracking-uri", uri, "--storage", storage,
                             "--no-live"], env=e, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _session(sid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(name)) == sid:
                    pids.append(int(name))
    return pids


def _signal_session(sid: int, sig: int) -> int:
    pids = _session(sid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return len(pids)


def _leases(storage, cells: list[str]) -> dict:
    return {c: lease for c in cells if (lease := storage.read_lease(c)) is not None}


def _wait(condition, what: str, procs, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        for p in procs:
            assert p.poll() is None, f"a driver ended while waiting for {what}:\n{p.stdout.read()}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _held_by(leases: dict, proc: subprocess.Popen) -> dict:
    return {c: lease for c, lease in leases.items() if f":{proc.pid}:" in lease.owner and lease.state == "held"}


def _logged(uri: str, name: str) -> dict[str, int]:
    """cell -> the highest step of ``loss`` in its active runs (what MLflow shows now)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    out: dict[str, int] = {}
    for run in client.search_runs([exp.experiment_id], "tags.`hpsweep.role` = 'cell'") if exp else []:
        steps = [m.step for m in run.data.to_proto().metrics if m.key == "loss"]
        cell = run.data.tags["hpsweep.cell_id"]
        out[cell] = max([out.get(cell, 0), *steps])
    return out


def _training(storage, cells: list[str], proc, uri: str, name: str, min_step: int) -> dict[str, int]:
    """The cells ``proc`` holds whose history reached ``min_step``: cell -> its step."""
    held, logged = _held_by(_leases(storage, cells), proc), _logged(uri, name)
    return {c: logged.get(c, 0) for c in held} if any(logged.get(c, 0) >= min_step for c in held) else {}


def _advanced(storage, held: dict[str, int], proc, uri: str, name: str) -> bool:
    """``proc`` holds (or finished) each of ``held``, whose history is 2 steps past where it was."""
    leases, logged = _leases(storage, list(held)), _logged(uri, name)
    return all(f":{proc.pid}:" in lease.owner and (lease.state == "done" or logged.get(c, 0) >= held[c] + 2)
               for c, lease in leases.items())


def check_cells(uri: str, name: str, storage, cells: list[str], reports: int = REPORTS) -> dict[str, str]:
    """Each cell: one active run, FINISHED, its history every step once and in order, and its
    stored checkpoint the last step's, published by that run. Returns cell -> run id."""
    client = MlflowClient(uri)
    by_cell: dict[str, list] = {}
    for run in child_runs(uri, name):
        by_cell.setdefault(run.data.tags["hpsweep.cell_id"], []).append(run)
    assert sorted(by_cell) == sorted(cells), (sorted(by_cell), sorted(cells))
    bad = {c: [r.info.status for r in rs] for c, rs in by_cell.items()
           if len(rs) != 1 or rs[0].info.status != "FINISHED"}
    assert not bad, bad
    out = {}
    for cell, (run,) in by_cell.items():
        for key in ("loss", "score"):
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)
            steps = [m.step for m in history]
            assert steps == list(range(1, reports + 1)), (cell, key, steps)
        stored = stored_checkpoint(storage, name, cell)
        if stored is None:   # a storage without checkpoint pointers (before issue 22): one file
            stored = (storage.read_bytes(name, "cells", cell, "checkpoint.pt"), None)
        data, pointer = stored
        assert data is not None, f"no stored checkpoint for {cell}"
        assert load_state(data) == {"step": reports}, (cell, load_state(data))
        assert pointer is not None and (pointer["step"], pointer["run_id"]) == (reports, run.info.run_id), \
            (cell, pointer)
        out[cell] = run.info.run_id
    return out


def _finished_counts(outputs: list[str]) -> list[int]:
    return [int(re.search(r"(\d+) cells finished, ", out).group(1)) for out in outputs]


def _split_brain(tmp_path, mlflow_server, moto_server, storage_uri: str) -> None:
    path, name = _sweep(tmp_path)
    cells = [c.id for c in plan(load_spec(str(path)))]
    storage = open_storage(storage_uri, moto_server.url)
    a = _driver(path, tmp_path, moto_server, mlflow_server.url, storage_uri)
    b = None
    try:
        # A trains at least one cell past step 3
        uri = mlflow_server.url
        _wait(lambda: _training(storage, cells, a, uri, name, 3), "A to train a cell", [a])
        frozen = _signal_session(a.pid, signal.SIGSTOP)
        t_stop = time.time()
        held = _training(storage, cells, a, uri, name, 0)
        assert held and frozen > 3, (held, frozen)
        time.sleep(TTL + 2)
        b = _driver(path, tmp_path, moto_server, uri, storage_uri)
        _wait(lambda: _advanced(storage, held, b, uri, name), "B to take A's cells over and advance them", [b])
        _signal_session(a.pid, signal.SIGCONT)
        print(f"\nA frozen {time.time() - t_stop:.1f}s holding {len(held)} cells at steps {sorted(held.values())}")
        (rc_a, out_a), (rc_b, out_b) = finish([a, b], timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            _signal_session(a.pid, signal.SIGCONT)
        for p in (a, b):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert rc_a == 0, out_a
    assert rc_b == 0, out_b
    check_cells(mlflow_server.url, name, storage, cells)
    taken = re.search(r"(\d+) cells taken over by (\S+)", out_a)
    assert taken and f":{b.pid}:" in taken.group(2) and int(taken.group(1)) == len(held), out_a
    assert sum(_finished_counts([out_a, out_b])) == len(cells), (out_a, out_b)
    for out in (out_a, out_b):
        print([line for line in out.splitlines() if "cells finished, " in line or "taken over by" in line])
    parents = MlflowClient(mlflow_server.url).search_runs(
        [MlflowClient(mlflow_server.url).get_experiment_by_name(name).experiment_id], "tags.`hpsweep.role` = 'sweep'")
    assert [p.info.status for p in parents] == ["FINISHED"], [p.info.status for p in parents]


def test_split_brain_local_storage(tmp_path, mlflow_server, moto_server) -> None:
    _split_brain(tmp_path, mlflow_server, moto_server, str(tmp_path / "storage"))


def test_split_brain_s3_storage(tmp_path, mlflow_server, moto_server, aws_env) -> None:
    _split_brain(tmp_path, mlflow_server, moto_server, f"s3://{moto_server.create_bucket()}/sweeps")


class _Proxy:
    """A TCP proxy on loopback to ``target``; :meth:`freeze` holds every byte in both directions
    (connections stay open, requests are delivered when it thaws), as a partition that heals."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.open = target, threading.Event()
        self.open.set()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.open.clear()

    def thaw(self) -> None:
        self.open.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                self.open.wait()
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()


def test_a_driver_cut_off_from_s3_writes_nothing_into_the_cells_it_lost(tmp_path, mlflow_server, moto_server,
                                                                         aws_env) -> None:
    path, name = _sweep(tmp_path)
    cells = [c.id for c in plan(load_spec(str(path)))]
    storage_uri = f"s3://{moto_server.create_bucket()}/sweeps"
    storage = open_storage(storage_uri, moto_server.url)
    host, port = moto_server.url.removeprefix("http://").split(":")
    proxy = _Proxy((host, int(port)))
    # A reaches S3 only through the proxy; MLflow directly
    a = _driver(path, tmp_path, moto_server, mlflow_server.url, storage_uri,
                AWS_ENDPOINT_URL=proxy.url, AWS_ENDPOINT_URL_S3=proxy.url)
    b = None
    try:
        uri = mlflow_server.url
        _wait(lambda: _training(storage, cells, a, uri, name, 3), "A to train a cell", [a])
        proxy.freeze()
        held = _training(storage, cells, a, uri, name, 0)
        time.sleep(TTL + 2)
        b = _driver(path, tmp_path, moto_server, uri, storage_uri)
        _wait(lambda: _advanced(storage, held, b, uri, name), "B to take A's cells over and advance them", [a, b])
        proxy.thaw()   # A's held requests (a checkpoint, a renewal) arrive now
        (rc_a, out_a), (rc_b, out_b) = finish([a, b], timeout=300)
    finally:
        proxy.thaw()
        for p in (a, b):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        proxy.close()
    assert rc_a == 0, out_a
    assert rc_b == 0, out_b
    check_cells(mlflow_server.url, name, storage, cells)
    assert sum(_finished_counts([out_a, out_b])) == len(cells), (out_a, out_b)
    # beside each cell's published checkpoint, only objects of an epoch that lost the cell
    # (what a cut-off holder can still leave: written, its publish unanswered), never read
    keys = [k for k in moto_server.keys(storage_uri.split("/")[2], "sweeps/") if k.endswith("checkpoint.pt")]
    published = {c: stored_checkpoint(storage, name, c)[1] for c in cells}
    extra = [k for k in keys if k.split("/")[-1] != published[k.split("/")[-2]]["key"]]
    assert all(int(k.split("/")[-1].split(".")[0]) < published[k.split("/")[-2]]["epoch"] for k in extra), \
        (extra, published)
    print(f"\n{len(extra)} checkpoint objects of a stale epoch left beside {len(cells)} published ones")


def test_a_killed_worker_cell_is_retried_without_waiting_out_the_ttl(tmp_path, mlflow_server, moto_server) -> None:
    starts = tmp_path / "starts"   # the sleep trainer appends a line here at each start
    path, name = _sweep(tmp_path, xs=(0.0,), reports=8, sleep=0.5, retries=2, starts=str(starts))
    [cell] = [c.id for c in plan(load_spec(str(path)))]
    storage_uri = str(tmp_path / "storage")
    storage = open_storage(storage_uri)
    ttl = 60   # a retry that waited for it would start 40 to 60 s after the kill
    a = _driver(path, tmp_path, moto_server, mlflow_server.url, storage_uri, HPSWEEP_LEASE_TTL=str(ttl))
    try:
        _wait(lambda: _training(storage, [cell], a, mlflow_server.url, name, 2), "two steps logged", [a])
        trial = storage.read_lease(cell).info["trial"]
        worker = _wait(lambda: _worker_of(a.pid), "the trial's worker", [a])
        expires = storage.read_lease(cell).expires
        os.kill(worker, signal.SIGKILL)
        killed = time.time()
        [(rc, out)] = finish([a], timeout=300)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    assert rc == 0, out
    [started_file] = starts.iterdir()
    assert len(started_file.read_text().split()) == 2, started_file.read_text()   # the kill, one retry
    started = started_file.stat().st_mtime   # the retry's start (its line appended)
    print(f"\nworker killed; its retry started {started - killed:.1f}s later "
          f"(the lease would have expired {expires - killed:.1f}s after the kill)")
    assert trial and started < expires, (started - killed, expires - killed)
    check_cells(mlflow_server.url, name, storage, [cell], reports=8)


def _worker_of(sid: int) -> int | None:
    """The pid of the Ray worker running a trial in session ``sid``."""
    for pid in _session(sid):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if cmd.startswith(b"ray::ImplicitFunc") or cmd.startswith(b"ray::_trial"):
                return pid
    return None


def test_copied_cells_are_told_as_copied(tmp_path, mlflow_server, moto_server) -> None:
    """A sweep whose cells another sweep finished copies them, and says so: no '[running
    elsewhere]' naming a driver that has exited, a summary that counts them."""
    storage = str(tmp_path / "storage")
    first, _ = _sweep(tmp_path, xs=(0.0, 1.0), reports=2, sleep=0.0)
    [(rc, out)] = finish([_driver(first, tmp_path, moto_server, mlflow_server.url, storage)])
    assert rc == 0, out
    second, name = _sweep(tmp_path, xs=(0.0, 1.0), reports=2, sleep=0.0)   # same cells, another name
    [(rc, out)] = finish([_driver(second, tmp_path, moto_server, mlflow_server.url, storage)])
    assert rc == 0, out
    assert "[running elsewhere]" not in out, out
    assert re.search(r"0 cells finished, 0 failed, 0 already done, 2 finished elsewhere "
                     r"\(2 copied from other sweeps\), 0 interrupted", out), out
    runs = child_runs(mlflow_server.url, name)
    assert len(runs) == 2 and all("hpsweep.copied_from" in r.data.tags for r in runs)
