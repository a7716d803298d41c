"""A SQLite-backed ``mlflow server`` under many writers: its connection pool against none.

What ``bench/slots.py`` found at 64 trials: the server answered 2 requests a second at 2 % of a
core, its requests waiting minutes for a pooled connection (HTTP 400 "QueuePool limit ...
connection timed out") while the connections that held one waited for SQLite's lock. Here, side
by side in the same run, each on a fresh store: N writers (threads with hpsweep's own REST
writer, as trial workers use it) each create a run, send a batch of three metrics a second for
D seconds, and end the run; once against the server as MLflow configures it (SQLAlchemy's
QueuePool), once with ``MLFLOW_SQLALCHEMYSTORE_POOLCLASS=NullPool`` (a connection a request),
and once with that and SQLite's write-ahead log. Retries are off: every refusal counts.
``--hogs`` busy processes load the machine as 64 trial workers and their raylets do: the pool
holds on an idle machine and collapses on a busy one.

    PYTHONPATH=$PWD python bench/mlflow_sqlite.py [--writers 64] [--seconds 30] [--hogs 4]

Measured here (2 cores, 64 writers, 30 s), idle: pooled 59.1 batches/s, NullPool 57.1, none
refused; with 4 hogs: pooled 2.6 batches/s and 37 requests refused (a 60 s wait for a
connection), NullPool 34.7 batches/s, none refused, p99 3.0 s (5.3x).
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"   # a refusal is counted, not retried

from hpsweep.store.rest import RestClient  # noqa: E402

BIN = Path(sys.executable).parent
MODES = {"pooled (MLflow's default)": {}, "NullPool": {"MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool"},
         "NullPool + WAL": {"MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool", "wal": "1"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(work: Path, settings: dict) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           **{k: v for k, v in settings.items() if k.startswith("MLFLOW_")}}
    db = work / "mlflow.db"
    subprocess.run([str(BIN / "python"), "-c", "import sys; from mlflow.tracking import MlflowClient; "
                    "MlflowClient(sys.argv[1]).search_experiments()", f"sqlite:///{db}"],
                   check=True, env=env, capture_output=True)   # the schema migrated first
    if settings.get("wal"):
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{db}",
                             "--default-artifact-root", str(work / "artifacts")],
                            env=env, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"mlflow server did not answer; see {work / 'server.log'}")


def _load(url: str, writers: int, seconds: float) -> dict:
    experiment = RestClient(url)._call("POST", "experiments/create", {"name": "load"})["experiment_id"]
    latency: dict[str, list[float]] = {"create": [], "batch": [], "end": []}
    refused: list[str] = []
    lock = threading.Lock()

    def timed(kind: str, call) -> bool:
        t = time.perf_counter()
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - every refusal is the measurement
            with lock:
                refused.append(f"{kind}: {str(exc)[-90:]}")
            return False
        with lock:
            latency[kind].append(time.perf_counter() - t)
        return True

    def writer(i: int) -> None:
        client, made = RestClient(url), {}
        if not timed("create", lambda: made.update(run=client.create_run(experiment, tags={"w": str(i)}))):
            return
        run_id, start, step = made["run"].info.run_id, time.time(), 0
        while time.time() - start < seconds:
            step += 1
            now = int(time.time() * 1000)
            metrics = [SimpleNamespace(key=k, value=float(step), timestamp=now, step=step)
                       for k in ("loss", "acc", "lr")]
            timed("batch", lambda: client.log_batch(run_id, metrics=metrics))
            time.sleep(1.0)
        timed("end", lambda: client.set_terminated(run_id, "FINISHED"))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    t0 = time.time()
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    return {"wall": time.time() - t0, "latency": latency, "refused": refused}


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[int(q * (len(xs) - 1))] if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--hogs", type=int, default=4, help="busy processes loading the machine meanwhile")
    args = parser.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    print(f"{args.writers} writers, a batch a second each for {args.seconds:.0f} s; {os.cpu_count()} cores, "
          f"{args.hogs} busy processes besides", flush=True)
    results = {}
    try:
        for name, settings in MODES.items():
            work = Path(tempfile.mkdtemp(prefix="hpsweep-mlflow-sqlite-"))
            proc, url = _server(work, settings)
            try:
                results[name] = _load(url, args.writers, args.seconds)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            r = results[name]
            print(f"  {name}: {len(r['latency']['batch'])} batches, {len(r['refused'])} refused", flush=True)
    finally:
        for h in hogs:
            h.kill()
    rows = [
        ("runs created", lambda r: f"{len(r['latency']['create'])}"),
        ("batches accepted", lambda r: f"{len(r['latency']['batch'])}"),
        ("batches a second", lambda r: f"{len(r['latency']['batch']) / r['wall']:.1f}"),
        ("batch latency p50 / p99, s",
         lambda r: f"{_pct(r['latency']['batch'], .5):.2f} / {_pct(r['latency']['batch'], .99):.2f}"),
        ("create latency max, s", lambda r: f"{max(r['latency']['create'], default=float('nan')):.1f}"),
        ("requests refused", lambda r: f"{len(r['refused'])}"),
    ]
    width, col = max(len(k) for k, _ in rows) + 2, max(len(n) for n in MODES) + 3
    print("\n" + " " * width + "".join(f"{n:>{col}}" for n in MODES))
    for key, value in rows:
        print(f"{key:<{width}}" + "".join(f"{value(results[n]):>{col}}" for n in MODES))
    base, best = results["pooled (MLflow's default)"], results["NullPool"]
    ratio = len(best["latency"]["batch"]) / max(len(base["latency"]["batch"]), 1)
    print(f"\nbatches accepted, NullPool / pooled: {ratio:.1f}x")
    for name, r in results.items():
        for why in sorted(set(r["refused"]))[:2]:
            print(f"  refused ({name}): {why}")


if __name__ == "__main__":
    main()
