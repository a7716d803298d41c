"""Command trainers: what running a program per cell costs, against the sleep trainer, side by side.

Three measurements, each printed as a table:

1. Extra cost per cell: in the worker alone (``train`` of an instant program against the sleep
   trainer's, N times each, no Ray or MLflow), then N instant cells (default 200) swept twice
   through ``hpsweep run`` against one local ``mlflow server``, as the sleep trainer
   (``reports: 1, sleep: 0``) and as a command trainer (a two-line shell script printing
   ``loss=X``), in that order and then the other way round; the difference of the time inside
   Ray Tune, per cell (target <= 50 ms).
2. Cost per parsed output line: ``train(config, run)`` in this process, with a Run that only
   counts, on a program printing L lines (default 2 x 10^5) of noise and of ``step=N loss=X`` pairs,
   against the same program writing to ``/dev/null``, the best of three runs each
   (target <= 20 us a line).
3. Memory: a sweep cell whose program prints 10^6 lines (every 100th a metric, 10^4 reports):
   the driver's and the worker's resident memory at 1, 25, 50, 75 and 100 % of the output.

Usage: ``python bench/command.py [--cells N] [--lines L] [--memory-lines M] [--skip PART,...]``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

PROGRAM = """\
    #!/bin/sh
    echo "loss=$2"
"""
#: prints LINES lines; every EVERY-th carries a metric; writes the worker's RSS (its parent's)
#: to RSS_FILE at 1, 25, 50, 75 and 100 % of the lines
CHATTY = """\
    import os, sys
    lines, every, rss_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    marks = {max(1, lines // 100), lines // 4, lines // 2, 3 * lines // 4, lines}
    out = sys.stdout
    def rss(pid):
        for row in open(f"/proc/{pid}/status"):
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) // 1024
    for i in range(1, lines + 1):
        if every and i % every == 0:
            out.write(f"step={i // every} loss={1.0 / i:.6g}\\n")
        else:
            out.write(f"batch {i} of {lines}: nothing to see here, just a line of output\\n")
        if i in marks:
            out.flush()
            with open(rss_file, "a") as f:
                f.write(f"{i} {rss(os.getppid())}\\n")
    out.flush()
"""


def sweep(name: str, trainer: str, cells: int, extra: str = "") -> str:
    config = "{reports: 1, sleep: 0.0}" if trainer == "sleep" else "{command: [./cell.sh]}"
    return textwrap.dedent(f"""\
        name: {name}
        trainer: {trainer}
        config: {config}
        parameters:
          x: {{range: [0, {cells - 1}]}}
        seeds: 1
        retries: 0
        metric: {{name: loss, mode: min}}
    """) + extra


def run_sweep(work: Path, env: dict, uri: str, text: str, log: Path, watch=None) -> tuple[float, float]:
    """(wall s, s inside Ray Tune) of one ``hpsweep run`` of the sweep file ``work/project/
    sweep.yaml`` (the project a command cell sees: its program and sweep file only);
    ``watch(proc)`` runs beside it."""
    project = work / "project"
    project.mkdir(exist_ok=True)
    (project / "sweep.yaml").write_text(text)
    hpsweep = str(Path(sys.executable).with_name("hpsweep"))
    for attempt in range(3):   # Ray's start-up times out on an overloaded machine: nothing ran yet
        start = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen([hpsweep, "run", "sweep.yaml", "--tracking-uri", uri, "--storage",
                                     str(work / "storage"), "--no-live"], env=env, cwd=project, stdout=out,
                                    stderr=subprocess.STDOUT)
            watcher = threading.Thread(target=watch, args=(proc,), daemon=True) if watch else None
            if watcher:
                watcher.start()
            proc.wait()
        wall = time.perf_counter() - start
        if proc.returncode == 0 or "timed out during startup" not in log.read_text() or attempt == 2:
            break
        print("  (Ray's start-up timed out: the machine is overloaded; starting again)", flush=True)
    if proc.returncode != 0:
        sys.exit(f"hpsweep run failed (exit {proc.returncode}); log: {log}\n" + log.read_text()[-3000:])
    fit = re.search(r"\(([0-9.]+)s running trials\)", log.read_text())
    return wall, float(fit.group(1)) if fit else wall


def per_cell(work: Path, env: dict, uri: str, cells: int) -> None:
    (work / "project").mkdir(exist_ok=True)
    (work / "project" / "cell.sh").write_text(textwrap.dedent(PROGRAM))
    (work / "project" / "cell.sh").chmod(0o755)
    fits: dict[str, list[float]] = {"sleep": [], "command": []}
    for round_, order in enumerate((("sleep", "command"), ("command", "sleep"))):
        for trainer in order:
            name = f"bench-{trainer}-{round_}-{int(time.time())}"
            wall, fit = run_sweep(work, env, uri, sweep(name, trainer, cells), work / f"{name}.log")
            fits[trainer].append(fit)
            print(f"  {trainer:<8} round {round_ + 1}: {cells} cells, wall {wall:6.1f}s, in Tune {fit:6.1f}s",
                  flush=True)
    sleep, command = sum(fits["sleep"]) / 2, sum(fits["command"]) / 2
    extra = (command - sleep) / cells * 1000
    print(f"\n{'trainer':<12}{'in Tune s':>11}{'per cell ms':>13}")
    print(f"{'sleep':<12}{sleep:11.1f}{sleep / cells * 1000:13.1f}")
    print(f"{'command':<12}{command:11.1f}{command / cells * 1000:13.1f}")
    print(f"extra cost of a command cell: {extra:.1f} ms (target <= 50 ms); ratio {command / sleep:.2f}x\n")


class Counting:
    """A Run that only counts reports (what parsing costs, not what tracking costs)."""

    metric = "loss"

    def __init__(self, base: Path) -> None:
        self.base, self.reports, self.saved = base, 0, 0

    def report(self, step, **metrics) -> None:
        self.reports += 1

    def save_checkpoint(self, state) -> None:
        self.saved += 1

    def load_checkpoint(self):
        return None

    def log_artifact(self, path) -> None:
        pass

    def data_path(self, uri):
        return self.base


def cell_overhead(work: Path, cells: int) -> None:
    """What a command cell costs in its worker, without Ray or MLflow: ``train`` of an instant
    program (a directory made and mirrored, the program started, read, stopped) against the
    sleep trainer's ``train`` with one report and no sleep, each ``cells`` times, in turn."""
    from hpsweep.trainer.command.config import config_class
    from hpsweep.trainer.command.training import train
    from hpsweep.trainer.config import build_config
    from trainers.sleep.config import Config as SleepConfig
    from trainers.sleep.training import train as sleep_train

    project = work / "project"
    project.mkdir(exist_ok=True)
    (project / "cell.sh").write_text(textwrap.dedent(PROGRAM))
    (project / "cell.sh").chmod(0o755)
    values = {"command": ["./cell.sh"], "x": 1.0}
    config, _ = build_config(config_class(values), values)
    sleep_config = SleepConfig(reports=1, sleep=0.0)
    best = {"sleep": float("inf"), "command": float("inf")}
    for _ in range(3):   # the best of three rounds, each way in turn: the machine is shared
        for label, fn, cfg in (("sleep", sleep_train, sleep_config), ("command", train, config)):
            start = time.perf_counter()
            for _ in range(cells):
                fn(cfg, Counting(project))
            best[label] = min(best[label], (time.perf_counter() - start) / cells * 1000)
    print(f"{'in the worker (no Ray, no MLflow)':<36}{'ms a cell':>10}")
    print(f"{'sleep trainer, 1 report':<36}{best['sleep']:10.2f}")
    print(f"{'command trainer, ./cell.sh':<36}{best['command']:10.2f}")
    print(f"extra cost of a command cell in its worker: {best['command'] - best['sleep']:.1f} ms\n")


def per_line(work: Path, lines: int) -> None:
    from hpsweep.trainer.command.config import config_class
    from hpsweep.trainer.command.training import train
    from hpsweep.trainer.config import build_config

    (work / "chatty.py").write_text(textwrap.dedent(CHATTY))
    print(f"{'output':<34}{'program alone s':>16}{'through train s':>16}{'per line us':>12}{'reports':>9}")
    for label, every in (("noise lines", 0), ("every line step=N loss=X", 1), ("1 line in 100 a metric", 100)):
        rss = work / f"rss-{every}"
        base = [sys.executable, str(work / "chatty.py"), str(lines), str(every), str(rss)]
        values = {"command": base, "args": [], "metrics": None}
        config, problems = build_config(config_class(values), values)
        assert not problems, problems
        alone, through = float("inf"), float("inf")
        for _ in range(3):   # the best of three, each way in turn: the machine is shared
            start = time.perf_counter()
            subprocess.run(base, stdout=subprocess.DEVNULL, check=True)
            alone = min(alone, time.perf_counter() - start)
            run = Counting(work)
            run.metric = "loss" if every else None
            start = time.perf_counter()
            train(config, run)
            through = min(through, time.perf_counter() - start)
        print(f"{label:<34}{alone:16.2f}{through:16.2f}{(through - alone) / lines * 1e6:12.2f}{run.reports:9d}",
              flush=True)
    print("target: <= 20 us a parsed line\n")


def memory(work: Path, env: dict, uri: str, lines: int) -> None:
    rss_file = work / "rss-worker"
    name = f"bench-chatty-{int(time.time())}"
    (work / "project").mkdir(exist_ok=True)
    (work / "project" / "chatty.py").write_text(textwrap.dedent(CHATTY))
    text = textwrap.dedent(f"""\
        name: {name}
        trainer: command
        config:
          command: ["{{python}}", chatty.py, "{lines}", "100", {str(rss_file)!r}]
          args: []
        seeds: 1
        retries: 0
        metric: {{name: loss, mode: min}}
    """)
    driver: dict[int, int] = {}   # lines printed -> the driver's RSS when the worker's was read

    def rss(pid: int) -> int:
        for row in open(f"/proc/{pid}/status"):
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) // 1024
        return 0

    def watch(proc) -> None:
        while proc.poll() is None:
            try:
                marks = [int(r.split()[0]) for r in rss_file.read_text().splitlines() if r.strip()]
                for mark in marks:
                    if mark not in driver:
                        driver[mark] = rss(proc.pid)
            except OSError:
                pass
            time.sleep(0.05)

    wall, fit = run_sweep(work, env, uri, text, work / f"{name}.log", watch)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    (run,) = client.search_runs([exp.experiment_id], "tags.`hpsweep.role` = 'cell'")
    points = len(client.get_metric_history(run.info.run_id, "loss"))
    print(f"a cell printing {lines:,} lines (every 100th a metric): wall {wall:.1f}s, in Tune {fit:.1f}s, "
          f"{points:,} loss points in MLflow (expected {lines // 100:,})")
    print(f"{'output printed':>15}{'worker RSS MiB':>16}{'driver RSS MiB':>16}")
    for row in rss_file.read_text().splitlines():
        count, worker_mb = map(int, row.split())
        print(f"{count / lines:>14.0%} {worker_mb:>15} {driver.get(count, 0) or '?':>15}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--lines", type=int, default=2 * 10 ** 5, help="lines a program prints in part 2")
    parser.add_argument("--memory-lines", type=int, default=10 ** 6, help="lines the cell prints in part 3")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: cells,lines,memory")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    work = Path(tempfile.mkdtemp(prefix="hpsweep-bench-command-"))
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    if "cells" not in skip:
        cell_overhead(work, args.cells)
    if "lines" not in skip:
        per_line(work, args.lines)
    if skip >= {"cells", "memory"}:
        return
    from servers import start_mlflow_server, start_moto_server, wait_settled  # the tests' own

    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(work / "ray"), "HOME": str(work / "home")}
    (work / "home").mkdir()
    moto = start_moto_server(work)
    mlflow = start_mlflow_server(moto, work)
    try:
        wait_settled(mlflow.process)
        if "cells" not in skip:
            per_cell(work, env, mlflow.url, args.cells)
        if "memory" not in skip:
            memory(work, env, mlflow.url, args.memory_lines)
    finally:
        mlflow.process.stop()
        moto.process.stop()
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
