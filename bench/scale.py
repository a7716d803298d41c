"""Scale of the planning side: ``hpsweep validate`` and ``plan`` of 10^3, 10^4, 10^5-cell grids.

The grids are the sleep trainer's, 10 seeds x (10 values)^k for k = 2, 3, 4 parameters (10^4
distinct configs at 10^5 cells). For each size it prints, measured side by side in this run:

- ``validate``: ``load_spec`` of the file (every distinct config checked once) and ``plan``
  (the cells with their ids), as ``hpsweep validate`` does them;
- ``floor``: a plain ``json.dumps`` + sha256 of every cell's resolved config, the least any
  content-addressed planner has to do;
- ``per-cell``: the previous approach, every cell's config validated and resolved on its own
  (``build_config`` + ``asdict`` + JSON round trip + ``cell_id``), once (the old code did it
  three times: spec, plan and trial);
- the ratios: validate+plan against the floor and against per-cell, and the per-cell cost of
  this size against the smallest (linear: ~1.0).

``--before DIR`` also times ``load_spec`` + ``plan`` with the code of another checkout (for
example the main branch before this change), in a subprocess, at the same sizes.
Targets (issue #11): validate and plan of 10^5 cells <= 2 s.

Then the run and status part (``--run-cells``, default 100,10000): ``hpsweep run`` of that
many instant cells against a local ``mlflow server`` (the per-cell cost, and its ratio between
the largest and the smallest size: target <= 1.5), a bare Tuner of as many instant trials
alongside, and ``hpsweep status`` of the largest sweep with every cell finished (target <= 3 s).

    PYTHONPATH=$PWD python bench/scale.py [--sizes 3,4,5] [--before /path/to/old/checkout]
                                          [--run-cells 100,10000] [--skip-bare]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARAMS = [("x", "grid: [" + ", ".join(f"{v / 10}" for v in range(10)) + "]"),
          ("reports", "range: [1, 10]"), ("extra_metrics", "range: [0, 9]"), ("fail_at", "range: [-1, 8]")]


def sweep_text(exponent: int) -> str:
    """10 seeds x 10^(exponent - 1) configs."""
    lines = ["name: scale", "trainer: sleep", "metric: {name: loss, mode: min}", "config: {sleep: 0.0}",
             "seeds: 10", "parameters:"]
    lines += [f"  {name}: {{{domain}}}" for name, domain in PARAMS[:exponent - 1]]
    return "\n".join(lines) + "\n"


def timed(fn):
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def validate_and_plan(path: Path):
    from hpsweep.spec.model import load_spec
    from hpsweep.spec.plan import plan

    t_load, spec = timed(lambda: load_spec(path))
    t_plan, cells = timed(lambda: plan(spec))
    return t_load, t_plan, cells


def floor(cells) -> float:
    def run():
        for c in cells:
            text = json.dumps({"trainer": "sleep", "config": c.config}, sort_keys=True, default=str)
            hashlib.sha256(text.encode()).hexdigest()
    return timed(run)[0]


def per_cell(cells) -> float:
    from hpsweep.spec.plan import cell_id
    from hpsweep.trainer.config import build_config
    from trainers.sleep.config import Config

    fixed = {"sleep": 0.0}

    def run():
        for c in cells:
            config, problems = build_config(Config, {**fixed, **c.params, "seed": c.seed})
            assert not problems
            cell_id("sleep", json.loads(json.dumps(dataclasses.asdict(config))))
    return timed(run)[0]


BEFORE = """
import sys, time
sys.path.insert(0, sys.argv[1])
from hpsweep.spec.model import load_spec
from hpsweep.spec.plan import plan
t0 = time.perf_counter(); spec = load_spec(sys.argv[2]); t1 = time.perf_counter()
cells = plan(spec); t2 = time.perf_counter()
print(t1 - t0, t2 - t1, len(cells))
"""


def before(checkout: str, path: Path) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", BEFORE, checkout, str(path)], capture_output=True,
                         text=True, cwd=checkout, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": checkout})
    if out.returncode:
        raise SystemExit(f"--before {checkout}: {out.stderr[-2000:]}")
    load, plan_s, _ = out.stdout.split()
    return float(load), float(plan_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,4,5", help="exponents of the cell counts (default 3,4,5)")
    parser.add_argument("--before", default=None, help="another checkout to time side by side")
    parser.add_argument("--run-cells", default="100,10000",
                        help="cell counts for the run and status part ('' to skip it)")
    parser.add_argument("--skip-bare", action="store_true", help="no bare Tune alongside the runs")
    args = parser.parse_args()
    exponents = [int(e) for e in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="hpsweep-scale-"))
    rows = []
    print(f"{'cells':>7} {'load':>7} {'plan':>7} {'total':>7} {'floor':>7} {'per-cell':>8} "
          f"{'x floor':>8} {'x per-cell':>10} {'us/cell':>8}" + ("  before: load plan total  speed-up"
                                                                   if args.before else ""))
    for e in exponents:
        path = tmp / f"scale-{e}.yaml"
        path.write_text(sweep_text(e))
        t_load, t_plan, cells = validate_and_plan(path)
        assert len(cells) == 10 ** e, len(cells)
        total = t_load + t_plan
        t_floor, t_cell = floor(cells), per_cell(cells)
        rows.append((e, total))
        line = (f"{len(cells):>7} {t_load:>7.3f} {t_plan:>7.3f} {total:>7.3f} {t_floor:>7.3f} {t_cell:>8.3f} "
                f"{total / t_floor:>8.2f} {total / t_cell:>10.3f} {total / len(cells) * 1e6:>8.2f}")
        if args.before:
            b_load, b_plan = before(args.before, path)
            line += f"  {b_load:>11.3f} {b_plan:>5.3f} {b_load + b_plan:>6.3f} {(b_load + b_plan) / total:>8.1f}x"
        print(line, flush=True)
        del cells
    if len(rows) > 1:
        (e0, t0), (e1, t1) = rows[0], rows[-1]
        print(f"per-cell cost at 10^{e1} against 10^{e0}: {(t1 / 10 ** e1) / (t0 / 10 ** e0):.2f} (linear: 1.0)")
    target = [t for e, t in rows if e == 5]
    if target:
        print(f"validate + plan of 10^5 cells: {target[0]:.2f} s (target <= 2 s)")

    if args.run_cells:
        run_and_status([int(n) for n in args.run_cells.split(",")], bare=not args.skip_bare)


# --- run and status: instant trials through a real `mlflow server` ---------------------------

BARE = """
import sys, time
import ray
from ray import tune
n = int(sys.argv[1])
def trainable(config):
    tune.report({"loss": float(config["x"])})
ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
         log_to_driver=False)
t0 = time.perf_counter()
tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), param_space={"x": tune.grid_search(list(range(n)))},
           tune_config=tune.TuneConfig(reuse_actors=True),
           run_config=tune.RunConfig(storage_path=sys.argv[2], verbose=0)).fit()
print("FIT", time.perf_counter() - t0)
"""


def run_sweep_text(n: int) -> str:
    return (f"name: instant-{n}\ntrainer: sleep\nmetric: {{name: loss, mode: min}}\n"
            f"config: {{sleep: 0.0, reports: 1}}\nparameters:\n  x: {{range: [0, {n - 1}]}}\n"
            "resources: {cpus: 1}\nretries: 0\n")


def run_and_status(sizes: list[int], bare: bool = True) -> None:
    """``hpsweep run`` of ``n`` instant cells (the sleep trainer, one report, no sleep) on 2 CPUs
    against a local ``mlflow server``, for each ``n``: wall, time in Tune, per-cell cost; a
    bare Tuner (``reuse_actors``, no tracking) of ``n`` instant trials alongside; then
    ``hpsweep status`` of the largest sweep, every cell finished."""
    import os
    import re

    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from servers import start_mlflow_server, start_moto_server, wait_settled  # the tests' own

    work = Path(tempfile.mkdtemp(prefix="hpsweep-scale-run-"))
    (work / "home").mkdir()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(work / "ray"), "HOME": str(work / "home"), "PYTHONPATH": str(ROOT)}
    moto = start_moto_server(work)
    mlflow = start_mlflow_server(moto, work)
    wait_settled(mlflow.process)
    env.update(moto.env)  # the MLflow server's artifacts are on S3
    hpsweep = str(Path(sys.executable).with_name("hpsweep"))
    print(f"\n{'cells':>7} {'wall':>8} {'in Tune':>8} {'ms/cell':>8} {'bare Tune':>10} {'ms/trial':>9} {'x bare':>7}",
          flush=True)
    per: dict[int, tuple[float, float | None]] = {}
    for n in sizes:
        path = work / f"instant-{n}.yaml"
        path.write_text(run_sweep_text(n))
        t0 = time.perf_counter()
        # a storage of its own per size: the sizes share cells (x = 0..99), which would else be
        # copied from the smaller sweep instead of run
        out = subprocess.run([hpsweep, "run", str(path), "--tracking-uri", mlflow.url, "--storage",
                              str(work / f"storage-{n}"), "--no-live"], env=env, cwd=work,
                             capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            raise SystemExit(f"hpsweep run of {n} cells failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
        fit = float(re.search(r"\(([0-9.]+)s running trials\)", out.stdout).group(1))
        b = None
        if bare:
            res = subprocess.run([sys.executable, "-c", BARE, str(n), str(work / f"bare-{n}")], env=env,
                                 cwd=work, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"bare Tune of {n} trials failed:\n{res.stderr[-3000:]}")
            b = float(res.stdout.split("FIT")[-1])
        per[n] = (fit / n, b / n if b else None)
        print(f"{n:>7} {wall:>7.1f}s {fit:>7.1f}s {fit / n * 1e3:>8.1f} "
              + (f"{b:>9.1f}s {b / n * 1e3:>9.1f} {fit / b:>7.2f}" if b else f"{'-':>10} {'-':>9} {'-':>7}"),
              flush=True)
    lo, hi = min(sizes), max(sizes)
    if lo != hi:
        ratio = per[hi][0] / per[lo][0]
        line = f"per-cell cost at {hi} cells against {lo}: hpsweep {ratio:.2f} (target <= 1.5)"
        if per[hi][1] and per[lo][1]:
            line += f", bare Tune {per[hi][1] / per[lo][1]:.2f}"
        print(line, flush=True)
    path = work / f"instant-{hi}.yaml"
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = subprocess.run([hpsweep, "status", str(path), "--tracking-uri", mlflow.url, "--storage",
                              str(work / f"storage-{hi}"), "--limit", "5"], env=env, cwd=work,
                             capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if out.returncode != 0 or f"done {hi}" not in out.stdout:
            raise SystemExit(f"hpsweep status of the {hi}-cell sweep:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    print(f"hpsweep status of {hi} finished cells against the mlflow server: best of 3 {min(times):.2f} s "
          f"(all: {', '.join(f'{t:.2f}' for t in times)}; target <= 3 s)", flush=True)
    mlflow.process.stop()
    moto.process.stop()


if __name__ == "__main__":
    main()
