"""Benchmark: `hpsweep report` over a 2,000-configuration sweep x 3 seeds x 100 metric steps
(6,000 runs) tracked to a local `mlflow server`. Target: under 30 s.

Prints the time to populate the server (log_batch from threads; not part of the target), the
report's time split into fetch (search_runs pages + bulk histories) and render (tables,
figures, files) and artifact logging, and, side by side on the same server, the bulk history
fetch against one get_metric_history request per run (in a thread pool) on a sample of runs.

    .venv/bin/python bench/report.py [--configs 2000] [--seeds 3] [--steps 100] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tests"))
sys.path.append(str(ROOT / "tests" / "integration"))

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

SPEC = """
name: bench-report
trainer: sleep
config: {{reports: {steps}}}
parameters:
  sleep: {{grid: [{sleeps}]}}
  x: {{grid: [{xs}]}}
seeds: {seeds}
metric: {{name: loss, mode: min}}
selection: {{group_by: [sleep], select_by: loss, over: [x], report: [loss, score]}}
claims:
  - {{id: low-sleep, text: "sleep has no effect on loss", kind: within, margin: 0.05,
      metric: loss, left: {{sleep: 0.0}}, right: {{sleep: 0.9}}}}
"""


def _curve(cell, steps: int) -> dict:
    # the sleep trainer's loss (x**2 + 1/(step+1) + a seed wobble), without the sleeping
    wobble = ((cell.seed * 7919) % 100) / 1000.0
    x = cell.params["x"]
    loss = [(s, x * x + 1.0 / (s + 1) + wobble) for s in range(1, steps + 1)]
    return {"loss": loss, "score": [(s, -v) for s, v in loss]}


def populate_sql(db: Path, template_run_id: str, cells, curve_of) -> None:
    """Clone a run that MLflow's API wrote (its row, its tags with the cell's values, params,
    metrics and latest metrics) once per cell, in one SQLite transaction: populating 6,000 runs
    through a one-worker server on a loaded 2-core machine takes the better part of an hour."""
    import json
    import sqlite3
    import uuid

    con = sqlite3.connect(db)
    cols = [r[1] for r in con.execute("PRAGMA table_info(runs)")]
    row = con.execute("SELECT * FROM runs WHERE run_uuid=?", (template_run_id,)).fetchone()
    tmpl = dict(zip(cols, row, strict=True))
    tags = dict(con.execute("SELECT key, value FROM tags WHERE run_uuid=?", (template_run_id,)))
    now = int(time.time() * 1000)
    runs, tag_rows, param_rows, metric_rows, latest_rows = [], [], [], [], []
    for cell in cells:
        rid = uuid.uuid4().hex
        row = {**tmpl, "run_uuid": rid, "name": f"cell-{cell.id}", "status": "FINISHED",
               "start_time": now, "end_time": now + 1000,
               "artifact_uri": tmpl["artifact_uri"].replace(template_run_id, rid)}
        runs.append(tuple(row[c] for c in cols))
        t = {**tags, "mlflow.runName": row["name"], "hpsweep.cell_id": cell.id,
             "hpsweep.seed": str(cell.seed), "hpsweep.params": json.dumps(cell.params)}
        tag_rows += [(k, v, rid) for k, v in t.items()]
        param_rows += [(k, str(v), rid) for k, v in cell.config.items()]
        for key, series in curve_of(cell).items():
            metric_rows += [(key, v, now + s, rid, s, 0) for s, v in series]
            s, v = series[-1]
            latest_rows.append((key, v, now + s, s, 0, rid))
    with con:
        con.executemany(f"INSERT INTO runs ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", runs)
        con.executemany("INSERT INTO tags (key, value, run_uuid) VALUES (?,?,?)", tag_rows)
        con.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?,?,?)", param_rows)
        con.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
                        "VALUES (?,?,?,?,?,?)", metric_rows)
        con.executemany("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid)"
                        " VALUES (?,?,?,?,?,?)", latest_rows)
    con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=int, default=2000, help="configurations (x 10 sleeps)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--keep", type=Path, help="reuse (or create) the MLflow store in this dir")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--api-cells", type=int, default=60,
                    help="cells logged through the server's API; the rest are cloned in SQL")
    args = ap.parse_args()

    from mlflow.tracking import MlflowClient
    from report_support import log_sweep
    from servers import VENV_BIN, free_port, group_cpu_seconds, http_ok, start_server, wait_settled, wait_until

    from hpsweep.spec.model import load_spec_text
    from hpsweep.spec.plan import plan
    from hpsweep.store.runs import load_sweep
    from hpsweep.views.report import build_report

    n_sleep = 10
    n_x = max(1, args.configs // n_sleep)
    spec = load_spec_text(SPEC.format(
        steps=args.steps, seeds=args.seeds,
        sleeps=", ".join(f"{i / 10:.1f}" for i in range(n_sleep)),
        xs=", ".join(f"{-2 + 4 * i / max(1, n_x - 1):.6f}" for i in range(n_x))))
    cells = plan(spec)
    work = args.keep or Path(tempfile.mkdtemp(prefix="hpsweep-bench-report-"))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "mlflow.db"
    fresh = not db.exists()
    port = free_port()
    server = start_server("mlflow", [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1",
                                     "--port", str(port), "--workers", "1",
                                     "--backend-store-uri", f"sqlite:///{db}",
                                     "--artifacts-destination", str(work / "artifacts")],
                          log_path=work / "mlflow.log", cwd=work,
                          env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # as docker/ ships it
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(server, lambda: http_ok(f"{url}/health"), timeout=180, what="/health")
        # mlflow server keeps working for a while after /health answers (start-up tasks in
        # the background); time the report against a settled server, as a user meets it.
        settle = wait_settled(server)
        print(f"mlflow server settled {settle:.0f} s after /health answered")
        client = MlflowClient(url)
        print(f"sweep: {len(cells)} cells ({len(cells) // args.seeds} configurations x "
              f"{args.seeds} seeds), {args.steps} steps x 2 metrics a run; store {db}")
        if fresh:
            t = time.perf_counter()
            head, rest = cells[:args.api_cells], cells[args.api_cells:]
            log_sweep(client, spec.name, head, lambda c: _curve(c, args.steps),
                      threads=args.threads)
            t_api = time.perf_counter() - t
            template = client.search_runs(
                [client.get_experiment_by_name(spec.name).experiment_id],
                "tags.`hpsweep.role` = 'cell'", max_results=1)[0].info.run_id
            t = time.perf_counter()
            populate_sql(db, template, rest, lambda c: _curve(c, args.steps))
            print(f"populate (not part of the target): {len(head)} runs through the server "
                  f"(create_run + log_batch + set_terminated, {args.threads} threads) in "
                  f"{t_api:.1f} s = {1000 * t_api / max(1, len(head)):.0f} ms a run; the other "
                  f"{len(rest)} cloned from one of them in SQL in {time.perf_counter() - t:.1f} s")

        for attempt in ("first", "second"):
            timings: dict = {}
            cpu0, scpu0 = time.process_time(), group_cpu_seconds(server.proc.pid)
            t = time.perf_counter()
            html, md = build_report(url, spec, work / "report", timings=timings)
            total = time.perf_counter() - t
            cpu = time.process_time() - cpu0
            scpu = group_cpu_seconds(server.proc.pid) - scpu0
            print(f"report ({attempt} run): {total:.1f} s total (target < 30 s) = fetch "
                  f"{timings['fetch_s']:.1f} s (search_runs {timings['search_s']:.1f} s, "
                  f"histories {timings['histories_s']:.1f} s) + render {timings['render_s']:.1f} s"
                  f" + log artifacts {timings['log_s']:.1f} s; {timings['runs']} runs; "
                  f"CPU: report process {cpu:.1f} s, mlflow server {scpu:.1f} s; "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"html {html} ({html.stat().st_size / 1e6:.1f} MB)")

        # bulk histories against one request per run, side by side on a sample
        sample = sorted(load_sweep(url, spec.name).cells.values(), key=lambda c: c.run_id)[:300]
        ids = [c.run_id for c in sample]
        t = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            per_run = list(pool.map(lambda r: client.get_metric_history(r, "loss"), ids))
        t_each = time.perf_counter() - t
        from hpsweep.store.runs import _histories  # the report's own bulk path

        t = time.perf_counter()
        bulk = _histories(client, {"loss": set(ids)})
        t_bulk = time.perf_counter() - t
        assert sum(len(h) for h in per_run) == sum(len(v["loss"]) for v in bulk.values())
        print(f"histories of {len(ids)} runs: bulk {t_bulk:.2f} s vs one request a run "
              f"({args.threads} threads) {t_each:.2f} s: {t_each / t_bulk:.1f}x")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
