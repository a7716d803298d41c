"""Orchestration overhead: hpsweep against bare Ray Tune, side by side in one run.

A grid of N trials (default 100), each sleeping 0.2 s before each of 5 reports of 10 metrics,
on 2 CPUs (one CPU a trial), run four ways, each in a fresh process with its own Ray:

  (a) ``hpsweep run`` tracking to a local ``mlflow server`` (what users run);
  (b) a bare ``tune.Tuner`` with defaults, no tracking;
  (c) a bare Tuner with ``reuse_actors=True``, no tracking;
  (d) a bare Tuner with Ray's ``MLflowLoggerCallback`` to the same server.

Prints each wall time (the whole process: Ray start-up included, the same for all four),
the utilisation = total sleep / (wall x 2), a's ratio to each, and the tracking cost per
reported result of (a) against (c). Usage: ``python bench/orchestration.py [--trials N]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

REPORTS, SLEEP, METRICS, CPUS = 5, 0.2, 10, 2

BARE = textwrap.dedent('''
    import os, sys, time
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")
    import ray
    from ray import tune
    mode, trials, uri = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    REPORTS, SLEEP, METRICS = {reports}, {sleep}, {metrics}

    def trainable(config):
        for step in range(REPORTS):
            time.sleep(SLEEP)
            tune.report({{f"m{{i}}": config["x"] * i + step for i in range(METRICS)}})

    ray.init(num_cpus={cpus}, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", log_to_driver=False)
    callbacks = []
    if mode == "mlflow":
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        callbacks = [MLflowLoggerCallback(tracking_uri=uri, experiment_name="bench-mlflow-cb")]
    tuner = tune.Tuner(
        tune.with_resources(trainable, {{"cpu": 1}}),
        param_space={{"x": tune.grid_search(list(range(trials)))}},
        tune_config=tune.TuneConfig(reuse_actors=(mode == "reuse")),
        run_config=tune.RunConfig(storage_path=sys.argv[4], callbacks=callbacks, verbose=0),
    )
    tuner.fit()
''').format(reports=REPORTS, sleep=SLEEP, metrics=METRICS, cpus=CPUS)


def sweep_yaml(trials: int) -> str:
    return textwrap.dedent(f"""
        name: bench-hpsweep-{int(time.time())}
        trainer: sleep
        config: {{reports: {REPORTS}, sleep: {SLEEP}, extra_metrics: {METRICS - 2}}}
        parameters:
          x: {{range: [0, {trials - 1}]}}
        seeds: 1
        metric: {{name: loss, mode: min}}
        resources: {{cpus: 1}}
        retries: 0
    """)


def timed(cmd: list[str], env: dict, cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} failed (exit {proc.returncode}); log: {log}\n"
                 + log.read_text()[-3000:])
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--skip", default="", help="comma-separated variants to skip: b,c,d")
    args = parser.parse_args()
    from servers import start_mlflow_server, start_moto_server, wait_settled  # the tests' own

    work = Path(tempfile.mkdtemp(prefix="hpsweep-bench-"))
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(work / "ray"), "HOME": str(work / "home")}
    (work / "home").mkdir()
    moto = start_moto_server(work)
    mlflow = start_mlflow_server(moto, work)
    uri = mlflow.url
    # A tracking server is long-lived: time against a settled, warmed-up one, as users meet it.
    settled = wait_settled(mlflow.process)
    from mlflow.tracking import MlflowClient

    warm = MlflowClient(uri)
    run = warm.create_run(warm.create_experiment("bench-warm-up"))
    warm.log_metric(run.info.run_id, "x", 1.0)
    warm.set_terminated(run.info.run_id)
    print(f"mlflow server settled after {settled:.0f}s", flush=True)
    total_sleep = args.trials * REPORTS * SLEEP
    ideal = total_sleep / CPUS
    print(f"{args.trials} trials x {REPORTS} reports x {SLEEP}s sleep, {METRICS} metrics a report, "
          f"{CPUS} CPUs: total sleep {total_sleep:.0f}s, ideal wall {ideal:.1f}s", flush=True)
    walls: dict[str, float] = {}
    try:
        (work / "sweep.yaml").write_text(sweep_yaml(args.trials))
        hpsweep = str(Path(sys.executable).with_name("hpsweep"))
        walls["a"] = timed([hpsweep, "run", "sweep.yaml", "--tracking-uri", uri, "--storage",
                            str(work / "storage"), "--no-live"], env, work, work / "a.log")
        print(f"(a) hpsweep run + MLflow server   {walls['a']:7.1f}s", flush=True)
        (work / "bare.py").write_text(BARE)
        for key, mode, label in (("b", "default", "bare Tuner, defaults"),
                                 ("c", "reuse", "bare Tuner, reuse_actors"),
                                 ("d", "mlflow", "bare Tuner + MLflowLoggerCallback")):
            if key in args.skip.split(","):
                continue
            walls[key] = timed([sys.executable, "bare.py", mode, str(args.trials), uri,
                                str(work / f"tune-{key}")], env, work, work / f"{key}.log")
            print(f"({key}) {label:<30} {walls[key]:7.1f}s", flush=True)
    finally:
        mlflow.process.stop()
        moto.process.stop()
    labels = {"a": "hpsweep run + MLflow server", "b": "bare Tuner, defaults",
              "c": "bare Tuner, reuse_actors", "d": "bare Tuner + MLflowLoggerCallback"}
    print(f"\n{'variant':<36}{'wall s':>9}{'util':>7}{'a / this':>10}")
    for key, wall in walls.items():
        print(f"({key}) {labels[key]:<32}{wall:9.1f}{total_sleep / (wall * CPUS):7.2f}"
              f"{walls['a'] / wall:10.2f}")
    import re

    fit = re.search(r"\(([0-9.]+)s running trials\)", (work / "a.log").read_text())
    if fit:
        fit_s = float(fit.group(1))
        print(f"\n(a) inside Ray Tune (start-up of Ray and MLflow left out): {fit_s:.1f}s, "
              f"utilisation {total_sleep / (fit_s * CPUS):.2f}")
    if "c" in walls:
        results = args.trials * REPORTS
        per_result = (walls["a"] - walls["c"]) / results * 1000
        print(f"\ntracking cost of (a) against (c): {per_result:.1f} ms per reported result "
              f"({results} results; target <= 20 ms)")
    best_bare = min(walls[k] for k in walls if k in ("b", "c")) if set(walls) & {"b", "c"} else None
    if best_bare:
        print(f"(a) against the best bare configuration: {walls['a'] / best_bare:.2f}x (target <= 1.0)")


if __name__ == "__main__":
    main()
