"""Benchmark: cold `hpsweep status`, `results` and `report` on a finished 12-cell sweep in the
default local store (SQLite and storage under ``.hpsweep/``), the median of 5 cold processes each,
side by side with ``python -c pass`` (the floor: an interpreter's start) in the same run.
Targets (issue #23): status and results <= 1.0 s, report <= 3 s; ``results`` of a finished
10^4-cell sweep <= 3 s (``--big``).

The sweep is the sleep trainer's (3 x values x 2 report counts x 2 seeds; ``--quickstart``:
sweeps/quickstart.yaml, the SnAp Copy task, a minute or so to run first). It is run once with
``hpsweep run`` of this checkout; then each command runs as a new process, measurements
interleaved between checkouts so that load on the machine touches both alike.
``--before DIR`` times another checkout's code (e.g. the main branch) on the same store.

    PYTHONPATH=$PWD python bench/cli.py [--before /path/to/checkout] [--runs 5] [--quickstart] [--big]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SWEEP = """name: bench-cli
trainer: sleep
config: {sleep: 0.0}
parameters:
  x: {grid: [-1.0, 0.0, 0.5]}
  reports: {grid: [3, 6]}
seeds: 2
metric: {name: loss, mode: min}
"""

BIG = """name: bench-cli-big
trainer: sleep
config: {sleep: 0.0, reports: 3}
parameters:
  x: {range: [0, 999]}
seeds: 10
metric: {name: loss, mode: min}
"""

COMMANDS = {"status": ["status", "sweep.yaml"], "results": ["results", "sweep.yaml"],
            "report": ["report", "sweep.yaml", "--out", "report"]}


def env_for(checkout: Path, work: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work / "home"),
            "PYTHONPATH": str(checkout), "MLFLOW_DISABLE_TELEMETRY": "true",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(work / "ray"), "LANG": "C.UTF-8"}


def cold(argv: list[str], checkout: Path, work: Path) -> float:
    t = time.perf_counter()
    out = subprocess.run(argv, cwd=work, env=env_for(checkout, work), capture_output=True, text=True)
    took = time.perf_counter() - t
    if out.returncode:
        raise SystemExit(f"{' '.join(argv)} ({checkout}): exit {out.returncode}\n"
                         f"{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return took


def hpsweep(*args: str) -> list[str]:
    return [sys.executable, "-c", "from hpsweep.cli import entry; entry()", *args]


def populate_big(work: Path) -> None:
    """A finished 10^4-cell sweep in the default SQLite store: one cell run through hpsweep's own
    tracking layout (MLflow's API), the others cloned from it in SQL (bench/report.py's
    ``populate_sql``): running 10^4 cells would take most of an hour here."""
    sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]
    os.chdir(work)
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from report import populate_sql
    from report_support import log_sweep

    from hpsweep.spec.model import load_spec
    from hpsweep.spec.plan import plan
    from hpsweep.store.mlflow import default_tracking_uri, mlflow_client

    spec = load_spec(work / "sweep.yaml")
    cells = plan(spec)
    uri = default_tracking_uri()
    client = mlflow_client(uri)

    def curve(cell):
        x = float(cell.params["x"]) / 1000
        loss = [(s, x * x + 1.0 / (s + 1)) for s in range(1, 4)]
        return {"loss": loss, "score": [(s, -v) for s, v in loss]}

    log_sweep(client, spec.name, cells[:1], curve, threads=1)
    eid = client.get_experiment_by_name(spec.name).experiment_id
    template = client.search_runs([eid], "tags.`hpsweep.role` = 'cell'", max_results=1)[0].info.run_id
    populate_sql(Path(uri[len("sqlite:///"):]), template, cells[1:], curve)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, default=None, help="another checkout, timed side by side")
    ap.add_argument("--runs", type=int, default=5, help="cold processes per command (median)")
    ap.add_argument("--quickstart", action="store_true", help="sweeps/quickstart.yaml instead of the sleep sweep")
    ap.add_argument("--big", action="store_true", help="also `results` of a finished 10^4-cell sweep")
    ap.add_argument("--keep", type=Path, default=None, help="work directory (reused when it has the sweep)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="hpsweep-bench-cli-"))
    (work / "home").mkdir(parents=True, exist_ok=True)
    checkouts = {"this": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    if not (work / ".hpsweep").exists():
        text = (ROOT / "sweeps" / "quickstart.yaml").read_text() if args.quickstart else SWEEP
        (work / "sweep.yaml").write_text(text)
        t = time.perf_counter()
        out = subprocess.run(hpsweep("run", "sweep.yaml", "--no-live"), cwd=work, env=env_for(ROOT, work),
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"hpsweep run: exit {out.returncode}\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
        print(f"sweep run once (not timed as a read): {time.perf_counter() - t:.1f} s; work dir {work}")
    cases = {"python -c pass": [sys.executable, "-c", "pass"]} | {
        f"hpsweep {name}": hpsweep(*argv) for name, argv in COMMANDS.items()}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.runs):  # interleaved: every case and checkout once per round
        for case, argv in cases.items():
            for who, checkout in checkouts.items():
                if case.startswith("python") and who != "this":
                    continue
                times.setdefault((case, who), []).append(cold(argv, checkout, work))
    targets = {"hpsweep status": 1.0, "hpsweep results": 1.0, "hpsweep report": 3.0}
    floor = statistics.median(times[("python -c pass", "this")])
    head = f"{'command':<18} {'this (s)':>9} {'- floor':>8} {'target':>7}"
    if args.before:
        head += f" {'before (s)':>11} {'speed-up':>9}"
    print(f"\nmedian of {args.runs} cold processes, {12 if not args.quickstart else 'quickstart'} cells, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n{head}")
    for case in cases:
        now = statistics.median(times[(case, "this")])
        line = f"{case:<18} {now:>9.2f} {now - floor:>8.2f} {targets.get(case, 0) or '':>7}"
        if args.before and (case, "before") in times:
            was = statistics.median(times[(case, "before")])
            line += f" {was:>11.2f} {was / now:>8.1f}x"
        print(line)
    if args.big:
        big = work / "big"
        (big / "home").mkdir(parents=True, exist_ok=True)
        if not (big / ".hpsweep").exists():
            (big / "sweep.yaml").write_text(BIG)
            t = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--populate-big", str(big)], check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
            print(f"\n10^4 finished cells populated in {time.perf_counter() - t:.1f} s (not timed as a read)")
        print(f"\n`hpsweep results` of 10^4 finished cells, median of {args.runs} cold processes (target <= 3 s)")
        for who, checkout in checkouts.items():
            took = [cold(hpsweep("results", "sweep.yaml", "--limit", "5"), checkout, big) for _ in range(args.runs)]
            print(f"  {who:<7} {statistics.median(took):.2f} s")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--populate-big":
        populate_big(Path(sys.argv[2]))
    else:
        main()
