"""What a trial's worker imports before its first cell starts, with ``python -X importtime``: this
checkout against another (``--before DIR``, e.g. the main branch), side by side in one run.

A Ray worker is up once it has imported ``ray``; before a cell of the sleep trainer starts it then
imports Ray Tune's function trainable, hpsweep's engine (where the trainable lives) and trial,
the trainer, and makes the cell's tracking client (``CellTracker``'s: MLflow's, or the lean
REST client where the tracking server allows it) and, before issue 24, torch (the device). Each
is done in a fresh process as the worker does it (the client made for an ``http://`` tracking
URI, nothing sent); printed: seconds and peak RSS after ``ray``, and the heaviest top-level
packages by import time.

    PYTHONPATH=$PWD python bench/worker_imports.py [--before /path/to/main] [--top 8]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import resource, sys, time
import ray
import ray.tune.trainable.function_trainable
t0 = time.perf_counter()
import hpsweep.run.engine
import hpsweep.run.trial as trial
import trainers.sleep.training
from hpsweep.store import tracker
client = getattr(tracker, "worker_client", None) or tracker.mlflow_client
client("http://127.0.0.1:9")
if "torch" in trial._run_cell.__code__.co_names or "torch" in trial._run_cell.__code__.co_varnames:
    import torch   # before issue 24: every cell's device
print("SECONDS", time.perf_counter() - t0)
print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print("TORCH", "torch" in sys.modules, "MLFLOW", "mlflow" in sys.modules)
"""

BASE = """
import resource, time
t0 = time.perf_counter()
import ray
import ray.tune.trainable.function_trainable
print("SECONDS", time.perf_counter() - t0)
print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def profile(code: Path, script: str) -> tuple[float, int, str, dict[str, float]]:
    """Seconds, peak RSS, flags, and the self time of each top-level package imported after Tune."""
    env = {**os.environ, "PYTHONPATH": str(code), "MLFLOW_TRACKING_URI": ""}
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", script], env=env, capture_output=True,
                         text=True, timeout=300, cwd=code)
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    seconds = float(re.search(r"SECONDS (\S+)", out.stdout).group(1))
    rss = int(re.search(r"RSS (\d+)", out.stdout).group(1))
    flags = (re.search(r"TORCH.*", out.stdout) or re.search("$", "")).group(0)
    packages: dict[str, float] = {}
    after = False
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if not m:
            continue
        name = m.group(4)
        if name == "ray.tune.trainable.function_trainable":
            after = True   # everything from here on is what the worker adds to a Tune worker
            continue
        if after:
            top = name.split(".")[0]
            packages[top] = packages.get(top, 0.0) + int(m.group(1)) / 1e6
    return seconds, rss, flags, packages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, default=None)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    base_s, base_rss, _, _ = profile(ROOT, BASE)
    codes = ([("before", args.before.resolve())] if args.before else []) + [("this", ROOT)]
    got = {label: profile(code, WORKER) for label, code in codes}
    print(f"a Tune worker (ray + Ray Tune's function trainable): {base_s:.2f}s, {base_rss / 2**20:.0f} MB peak RSS")
    print(f"\n{'after that, until a sleep cell starts':<44}" + "".join(f"{k:>12}" for k in got))
    print(f"{'seconds':<44}" + "".join(f"{v[0]:>12.2f}" for v in got.values()))
    print(f"{'peak RSS of the process, MB':<44}" + "".join(f"{v[1] / 2**20:>12.0f}" for v in got.values()))
    for label, (_, _, flags, _) in got.items():
        print(f"{label}: {flags}")
    for label, (_, _, _, packages) in got.items():
        top = sorted(packages.items(), key=lambda kv: -kv[1])[:args.top]
        print(f"\n{label}: the heaviest packages imported (self time, s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in top))


if __name__ == "__main__":
    main()
