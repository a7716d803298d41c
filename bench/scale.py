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

    PYTHONPATH=$PWD python bench/scale.py [--sizes 3,4,5] [--before /path/to/old/checkout]
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
    from hpsweep.plan import plan
    from hpsweep.spec import load_spec

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
    from hpsweep.plan import cell_id
    from trainers.common.config import build_config
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
from hpsweep.spec import load_spec
from hpsweep.plan import plan
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

    # --- status and run parts -------------------------------------------------------------
    # Left for the helper that adds `hpsweep status` of a finished 10^4-cell sweep against a
    # local `mlflow server` (target <= 3 s) and the per-cell cost of a run of instant trials
    # at 10^4 cells against 10^2 (within 1.5x; bare Tune's alongside). Add them here.


if __name__ == "__main__":
    main()
