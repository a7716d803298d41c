"""Cluster scale on one machine: 64 trials at once on a loopback Ray cluster of 8 nodes of 8 CPUs.

Started here, each a real process: the nodes (a head and 7 ``ray start --address``, no dashboard),
an ``mlflow server`` (SQLite, its job runner off) with S3 artifacts on ``moto_server``, and
``hpsweep run --address`` as the driver, with checkpoints and leases in S3. The sweep: the sleep
trainer, 256 cells of 30 reports of 1 s, a checkpoint every 5 reports, one CPU a trial.

Printed, all measured in the same run (a table a column a code base: ``--before DIR`` runs the
same sweep again with another checkout's code, e.g. the main branch, on a fresh cluster):

- utilisation: the cells' sleep time / (slots x the driver's wall time), and the same over the
  span of Ray Tune's trials alone (the driver's own start-up left out); target >= 0.9;
- MLflow: requests a second (the server's access log) and the server's CPU per request; the
  driver's CPU per cell;
- peak RSS of a trial's worker, of a raylet and of the driver (``VmHWM``), the PSS of a worker
  (its share of what the workers share), and the machine's memory in use at its peak;
- the first cell of each worker: seconds from the worker process's start to its first run in
  MLflow (the tag ``hpsweep.worker_pid``; the code under test only). Ray starts workers ahead
  (when the driver connects), so this includes the driver's own start-up; what a worker imports
  between being up and its first cell is ``bench/worker_imports.py``'s;
- failures, and from MLflow: one FINISHED run per cell with every step once, in order.

Then the live table's cost at 64 running rows: CPU seconds a second of ``LiveTable`` fed 64
results a second, drawing to a terminal (target <= 5 % of a core).

    PYTHONPATH=$PWD python bench/slots.py [--nodes 8] [--cpus 8] [--cells 256] [--reports 30]
                                          [--sleep 1.0] [--before /path/to/other/checkout]

Measured here (2 cores shared, load 15 to 40): a worker's peak RSS 464 MB before issue 24 (PSS
327), 249 to 286 MB after (PSS 163 to 195; a bare Tune trial's worker 196 MB): 64 slots of the
code before do not fit a 24 GB machine, hence ``--before-nodes``. At 64 slots, the tracking
server with SQLAlchemy's connection pool: wall 1436 s, 6 cells failed, utilisation 0.08, 2
requests a second; without the pool (``MLFLOW_SQLALCHEMYSTORE_POOLCLASS=NullPool``,
``bench/mlflow_sqlite.py``): wall 258 s, 0 failed, every step once, 0.47 (0.69 over the trials'
span), 24 requests a second at 16 ms of server CPU each. What is left is start-up: 64 workers
importing Ray Tune on 2 cores (a worker's first cell 74 s after it started, median).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

_TICK = os.sysconf("SC_CLK_TCK")


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime"):
            return float(line.split()[1])
    return 0.0


BOOT = _boot_time()


def _status(pid: str) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _pss(pid: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def _meminfo() -> dict[str, int]:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info[key] = int(value.split()[0]) * 1024
    return info


def _used_memory() -> int:
    info = _meminfo()
    return info["MemTotal"] - info["MemAvailable"]


#: the machine is shared: below this much available memory the run is stopped (its driver
#: SIGTERMed), not left to the kernel's OOM killer, which may pick someone else's process
_MIN_AVAILABLE = 1 << 30


class Sampler:
    """Every second: the peak RSS of each worker, raylet and the driver; every 5 s the PSS of the
    workers; the machine's memory in use; each worker's start time."""

    def __init__(self, driver_pid: int, sessions: set[int]) -> None:
        self.driver = str(driver_pid)
        self.sessions = sessions   # the nodes' sessions: their raylets and workers, no one else's
        self.hwm: dict[str, dict[str, int]] = {"worker": {}, "raylet": {}, "driver": {}}
        self.pss: list[int] = []
        self.started: dict[int, float] = {}   # worker pid -> its start (epoch seconds)
        self.peak_used = 0
        self.aborted = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            info = _meminfo()
            self.peak_used = max(self.peak_used, info["MemTotal"] - info["MemAvailable"])
            if info["MemAvailable"] < _MIN_AVAILABLE and not self.aborted:
                self.aborted = True
                print(f"bench: {info['MemAvailable'] >> 20} MB available: stopping the run", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(self.driver), signal.SIGTERM)
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                try:
                    stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                    if d.name != self.driver and int(stat[3]) not in self.sessions:
                        continue
                    cmd = (d / "cmdline").read_bytes()
                    kind = ("driver" if d.name == self.driver else
                            "worker" if cmd.startswith(b"ray::ImplicitFunc") else
                            "raylet" if b"/raylet/raylet" in cmd.split(b"\0")[0] else None)
                    if kind is None:
                        continue
                    hwm = _status(d.name).get("VmHWM", 0)
                    self.hwm[kind][d.name] = max(self.hwm[kind].get(d.name, 0), hwm)
                    if kind == "worker":
                        if int(d.name) not in self.started:
                            self.started[int(d.name)] = BOOT + int(stat[19]) / _TICK
                        if n % 5 == 0:
                            self.pss.append(_pss(d.name))
                except (OSError, ValueError, IndexError):
                    continue
            n += 1
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclasses.dataclass
class Result:
    label: str
    wall: float = 0.0
    fit: float = 0.0
    span: float = 0.0
    requests: int = 0
    server_cpu: float = 0.0
    driver_cpu: float = 0.0
    worker_rss: int = 0
    worker_pss: int = 0
    raylet_rss: int = 0
    driver_rss: int = 0
    machine: int = 0
    first_cell: list[float] = dataclasses.field(default_factory=list)
    workers: int = 0
    failed: int = -1
    runs_ok: str = ""
    slots: int = 0
    cells: int = 0
    floor_rss: int = 0


#: a bare Tune trainable that only sleeps and reports, on the same cluster: the least a Tune
#: trial's worker costs (Ray 2.60 imports pandas, pyarrow and ray.data with Ray Tune)
FLOOR = """
import sys, time
import ray
from ray import tune
trials, reports, sleep = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def trainable(config):
    for step in range(reports):
        time.sleep(sleep)
        tune.report({"loss": 1.0 / (step + 1)})
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
tune.Tuner(tune.with_resources(trainable, {"cpu": 1}),
           param_space={"x": tune.grid_search(list(range(trials)))},
           tune_config=tune.TuneConfig(reuse_actors=True),
           run_config=tune.RunConfig(storage_path=sys.argv[5], verbose=0)).fit()
"""


def sweep_yaml(name: str, cells: int, reports: int, sleep: float, every: int) -> str:
    return (f"name: {name}\ntrainer: sleep\nmetric: {{name: loss, mode: min}}\n"
            f"config: {{reports: {reports}, sleep: {sleep}}}\n"
            f"parameters:\n  x: {{range: [0, {cells - 1}]}}\n"
            f"resources: {{cpus: 1}}\ncheckpoint: {{every: {every}}}\nretries: 0\n")


def check_runs(uri: str, name: str, cells: int, reports: int) -> tuple[str, list]:
    """One FINISHED run per cell, every step of ``loss`` once, in order (read from MLflow)."""
    from mlflow.tracking import MlflowClient

    from hpsweep.store.runs import load_sweep

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return f"no experiment {name!r}: nothing ran", []
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], "tags.`hpsweep.role` = 'cell'", max_results=5000,
                                  page_token=token)
        runs += page
        token = page.token
        if not token:
            break
    by_cell: dict[str, list[str]] = {}
    for r in runs:
        by_cell.setdefault(r.data.tags["hpsweep.cell_id"], []).append(r.info.status)
    problems = []
    if len(by_cell) != cells:
        problems.append(f"{len(by_cell)} cells have runs, {cells} planned")
    problems += [f"{c}: {v}" for c, v in by_cell.items() if v != ["FINISHED"]][:3]
    swept = load_sweep(uri, name, histories=["loss"])
    steps_ok = sum(1 for c in swept.cells.values()
                   if [s for s, _ in c.histories.get("loss", [])] == list(range(1, reports + 1)))
    # every point once: no two points at one step (histories keep the latest of duplicates)
    dup = 0
    for c in list(swept.cells.values())[:32]:
        points = client.get_metric_history(c.run_id, "loss")
        dup += len(points) - len({m.step for m in points})
    if steps_ok != cells:
        problems.append(f"{cells - steps_ok} cells without steps 1..{reports} once each")
    if dup:
        problems.append(f"{dup} duplicated points in 32 cells' histories")
    verdict = "ok" if not problems else "; ".join(problems)
    return f"{verdict} ({len(by_cell)} cells, {steps_ok} with every step once)", runs


def one_run(label: str, code: Path, args, moto, mlflow_server, work: Path, nodes_n: int,
            cells: int, floor: bool = False) -> Result:
    from raynodes import start_ray_nodes
    from servers import group_cpu_seconds

    res = Result(label, slots=nodes_n * args.cpus, cells=cells)
    base = Path(tempfile.mkdtemp(prefix="hps", dir="/tmp"))  # Ray's socket paths must stay short
    creds = {k: v for k, v in moto.env.items() if k.startswith("AWS_") and "ENDPOINT" not in k}
    pythonpath = {"PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    nodes = start_ray_nodes(base, nodes_n, args.cpus, node_env={**creds, **pythonpath})
    print(f"[{label}] {nodes_n} nodes x {args.cpus} CPUs up in {time.perf_counter() - t0:.0f}s", flush=True)
    name = f"slots-{re.sub(r'[^A-Za-z0-9]+', '-', label)}-{secrets.token_hex(3)}"
    sweep = work / f"{name}.yaml"
    sweep.write_text(sweep_yaml(name, cells, args.reports, args.sleep, args.every))
    bucket = moto.create_bucket()
    env = {**os.environ, **nodes.env, **moto.env, **pythonpath}   # the token in HOME/.ray
    log = work / f"{name}.log"
    log_before = mlflow_server.process.log_path.read_text(errors="replace").count("HTTP/1.1")
    cpu_before = group_cpu_seconds(mlflow_server.process.proc.pid)
    hpsweep = str(Path(sys.executable).with_name("hpsweep"))
    try:
        with open(log, "w") as out:
            start = time.perf_counter()
            proc = subprocess.Popen([hpsweep, "run", str(sweep), "--address", nodes.gcs_address,
                                     "--tracking-uri", mlflow_server.url, "--storage", f"s3://{bucket}/s",
                                     "--s3-endpoint", moto.url, "--no-live"],
                                    env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT)
            sampler = Sampler(proc.pid, {node.proc.pid for node in nodes.nodes})
            _, status, usage = os.wait4(proc.pid, 0)
            res.wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            sampler.stop()
        res.driver_cpu = usage.ru_utime + usage.ru_stime
        res.server_cpu = group_cpu_seconds(mlflow_server.process.proc.pid) - cpu_before
        res.requests = mlflow_server.process.log_path.read_text(errors="replace").count("HTTP/1.1") - log_before
        if floor:
            res.floor_rss = bare_tune_worker(nodes, work, nodes_n * args.cpus)
    finally:
        nodes.stop()
        shutil.rmtree(base, ignore_errors=True)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        print(f"[{label}] hpsweep run exited {proc.returncode}; log {log}:\n{text[-3000:]}", flush=True)
    fit = re.search(r"\(([0-9.]+)s running trials\)", text)
    res.fit = float(fit.group(1)) if fit else 0.0
    done = re.search(r"(\d+) cells finished, (\d+) failed", text)
    res.failed = int(done.group(2)) if done else -1
    res.runs_ok, runs = check_runs(mlflow_server.url, name, cells, args.reports)
    starts = [r.info.start_time / 1000 for r in runs]
    ends = [r.info.end_time / 1000 for r in runs if r.info.end_time]
    res.span = max(ends) - min(starts) if starts and ends else 0.0
    first: dict[int, float] = {}
    for r in runs:
        pid = r.data.tags.get("hpsweep.worker_pid")
        if pid and int(pid) in sampler.started:
            first[int(pid)] = min(first.get(int(pid), float("inf")), r.info.start_time / 1000)
    res.first_cell = sorted(t - sampler.started[p] for p, t in first.items())
    res.workers = len(sampler.hwm["worker"])
    res.worker_rss = max(sampler.hwm["worker"].values(), default=0)
    res.worker_pss = max(sampler.pss, default=0)
    res.raylet_rss = max(sampler.hwm["raylet"].values(), default=0)
    res.driver_rss = max(sampler.hwm["driver"].values(), default=0)
    res.machine = sampler.peak_used
    print(f"[{label}] done: wall {res.wall:.0f}s, {res.failed} failed; runs: {res.runs_ok}", flush=True)
    return res


def bare_tune_worker(nodes, work: Path, trials: int) -> int:
    """The peak RSS of a bare Tune trial's worker (:data:`FLOOR`) on the cluster ``nodes``."""
    script = work / "floor.py"
    script.write_text(FLOOR)
    proc = subprocess.Popen([sys.executable, str(script), nodes.gcs_address, str(trials), "5", "1.0",
                             str(work / "floor-tune")], env={**os.environ, **nodes.env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sampler = Sampler(proc.pid, {node.proc.pid for node in nodes.nodes})
    proc.wait()
    sampler.stop()
    return max(sampler.hwm["worker"].values(), default=0)


def live_table_cost(rows: int = 64, seconds: float = 10.0) -> tuple[float, int]:
    """CPU seconds a second that the live table costs the driver at ``rows`` running trials, each
    sending a result a second, drawn to a terminal (a file standing in for one)."""
    from rich.console import Console

    from hpsweep.spec.model import load_spec_text
    from hpsweep.spec.plan import plan
    from hpsweep.views.live import LiveTable

    spec = load_spec_text(sweep_yaml("live", rows, 30, 1.0, 5), "live.yaml")
    cells = plan(spec)
    with open(os.devnull, "w") as sink:
        console = Console(file=sink, force_terminal=True, width=120)
        table = LiveTable(spec, cells, console=console, enabled=True, total=len(cells))
        with table:
            for i, c in enumerate(cells):
                table.started(f"t{i}", {"cell": c.id})
            cpu0, t0, sent, step = time.process_time(), time.perf_counter(), 0, 0
            while time.perf_counter() - t0 < seconds:
                step += 1
                for i in range(rows):   # a result from every trial, spread over the second
                    table.result(f"t{i}", {"step": step, "loss": 1.0 / step})
                    sent += 1
                    time.sleep(1.0 / rows)
            cpu = time.process_time() - cpu0
            wall = time.perf_counter() - t0
    return cpu / wall, sent


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=8)
    parser.add_argument("--cells", type=int, default=256)
    parser.add_argument("--reports", type=int, default=30)
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--before", type=Path, default=None,
                        help="another checkout (e.g. the main branch), run side by side with this one "
                             "on --before-nodes nodes (and as many cells a slot)")
    parser.add_argument("--before-nodes", type=int, default=2,
                        help="nodes of the side-by-side runs (the code before issue 24 needs about "
                             "470 MB a slot: 64 slots do not fit a 24 GB machine)")
    parser.add_argument("--skip-floor", action="store_true", help="no bare Tune trial for comparison")
    parser.add_argument("--skip-live", action="store_true")
    args = parser.parse_args()
    from servers import start_mlflow_server, start_moto_server, wait_settled

    slots = args.nodes * args.cpus
    per_slot = args.cells / slots
    print(f"{args.nodes} nodes x {args.cpus} CPUs = {slots} slots; {args.cells} cells x {args.reports} "
          f"reports x {args.sleep}s, checkpoint every {args.every}: ideal wall "
          f"{args.cells * args.reports * args.sleep / slots:.0f}s; this machine: {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}, {_mb(_used_memory())} MB in use", flush=True)
    work = Path(tempfile.mkdtemp(prefix="hpsweep-slots-"))
    moto = start_moto_server(work)
    mlflow_server = start_mlflow_server(moto, work)
    wait_settled(mlflow_server.process)
    runs = []   # (label, code, nodes)
    if args.before:
        small = f"{args.before_nodes * args.cpus} slots"
        runs += [(f"before, {small}", args.before.resolve(), args.before_nodes),
                 (f"this, {small}", ROOT, args.before_nodes)]
    runs.append((f"this, {slots} slots", ROOT, args.nodes))
    results = []
    try:
        for i, (label, code, n) in enumerate(runs):
            results.append(one_run(label, code, args, moto, mlflow_server, work, n,
                                   round(per_slot * n * args.cpus), floor=not args.skip_floor and i == len(runs) - 1))
    finally:
        mlflow_server.process.stop()
        moto.process.stop()

    def util(r: Result, wall: float) -> str:
        return f"{r.cells * args.reports * args.sleep / (r.slots * wall):.2f}" if wall else "-"

    rows = [
        ("cells", lambda r: f"{r.cells}"),
        ("wall (driver), s", lambda r: f"{r.wall:.0f}"),
        ("trials' span (first run to last end), s", lambda r: f"{r.span:.0f}"),
        ("utilisation: sleep / (slots x wall)", lambda r: util(r, r.wall)),
        ("utilisation over the trials' span", lambda r: util(r, r.span)),
        ("MLflow requests / s (over the span)", lambda r: f"{r.requests / r.span:.0f}" if r.span else "-"),
        ("MLflow server CPU per request, ms", lambda r: f"{r.server_cpu / max(r.requests, 1) * 1e3:.1f}"),
        ("MLflow server CPU, % of a core", lambda r: f"{r.server_cpu / r.span * 100:.0f}" if r.span else "-"),
        ("driver CPU per cell, ms", lambda r: f"{r.driver_cpu / r.cells * 1e3:.0f}"),
        ("driver CPU, % of a core", lambda r: f"{r.driver_cpu / r.wall * 100:.0f}"),
        ("trial workers seen", lambda r: f"{r.workers}"),
        ("peak RSS of a worker, MB", lambda r: _mb(r.worker_rss)),
        ("peak PSS of a worker, MB", lambda r: _mb(r.worker_pss)),
        ("peak RSS of a bare Tune trial's worker, MB", lambda r: _mb(r.floor_rss) if r.floor_rss else "-"),
        ("peak RSS of a raylet, MB", lambda r: _mb(r.raylet_rss)),
        ("peak RSS of the driver, MB", lambda r: _mb(r.driver_rss)),
        ("machine memory in use at the peak, MB", lambda r: _mb(r.machine)),
        ("first cell after its worker process started, s (median / max)",
         lambda r: f"{statistics.median(r.first_cell):.1f} / {max(r.first_cell):.1f}" if r.first_cell else "-"),
        ("failures", lambda r: f"{r.failed}"),
    ]
    width = max(len(k) for k, _ in rows) + 2
    col = max(16, *(len(r.label) + 2 for r in results))
    print(f"\n{'':<{width}}" + "".join(f"{r.label:>{col}}" for r in results))
    for key, value in rows:
        print(f"{key:<{width}}" + "".join(f"{value(r):>{col}}" for r in results))
    for r in results:
        print(f"{'runs in MLflow (' + r.label + ')':<{width}}{r.runs_ok}")
    if not args.skip_live:
        cost, sent = live_table_cost(slots)
        print(f"\nlive table at {slots} running rows, {sent} results: {cost * 100:.1f} % of a core "
              f"(target <= 5 %)")


if __name__ == "__main__":
    main()
