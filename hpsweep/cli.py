"""``hpsweep``: validate | run | status | results | history | list | report | ui | schema | new
trainer, and against a Ray cluster submit | logs | stop | render rayjob (see :mod:`hpsweep.cluster`).

User errors (a bad sweep file, an unreachable server, a bad flag) print their message and exit
with 2, without a traceback; ``--debug`` shows it. Ray is imported only by ``run``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from rich.console import Console

from hpsweep import __version__
from hpsweep.errors import UsageError, UserError

__all__ = ["main", "build_parser"]

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


FORMATS = ("table", "csv", "json", "markdown")


def _add_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite under .hpsweep/)")


def _load(path: str, args=None):
    """The sweep file at ``path`` with the command's ``--set`` overrides applied."""
    from hpsweep.spec.model import load_spec

    return load_spec(path, getattr(args, "overrides", None) or ())


#: the commands that read sweep files take ``--set FIELD=VALUE`` (hpsweep.spec.overrides)
_OVERRIDABLE = ("validate", "run", "submit", "status", "results", "history", "report")


def _add_overrides(sub) -> None:
    """``--set`` on every command that reads a sweep file: one place, one flag."""
    from hpsweep.spec.overrides import add_flag

    for name in _OVERRIDABLE:
        add_flag(sub.choices[name])


# --- commands -------------------------------------------------------------------------------

def cmd_validate(args) -> int:
    from hpsweep.spec.model import SpecError
    from hpsweep.spec.plan import plan

    bad = 0
    for path in args.sweeps:
        try:
            spec = _load(path, args)
        except SpecError as exc:  # every file is checked: report this one and go on
            bad += 1
            _print_user_error(exc, args.debug)
            continue
        cells = plan(spec)
        what = f"{len(cells)} cells" if cells else f"{spec.search.samples} optuna samples"
        console.print(f"ok: {path}: {spec.name!r}, trainer {spec.trainer}, {what}", markup=False)
    return 2 if bad else 0


def cmd_run(args) -> int:
    from hpsweep.api import Sweep
    from hpsweep.run.resources import node_wait
    from hpsweep.store.mlflow import resolve_tracking_uri

    spec = _load(args.sweep, args)  # every problem reported before Ray starts
    tracking_uri, storage = resolve_tracking_uri(args.tracking_uri), args.storage or os.environ.get("HPSWEEP_STORAGE")
    sweep, wait_s = Sweep(Path(args.sweep), spec, tracking_uri, storage, args.s3_endpoint), node_wait(args.node_wait)
    outcome = sweep.run(address=args.address, live=False if args.no_live else None, console=console,
                        node_wait=wait_s, allow_local_store=args.allow_local_store)
    if outcome.waited:
        err_console.print(f"stopped: {outcome.waited} for {wait_s:.0f}s with no trial started; "
                          f"the {outcome.total - outcome.skipped} unfinished cells are left pending. Run "
                          "the same command again once the cluster has such a node (--node-wait "
                          "SECONDS to wait longer), or lower resources with --set", markup=False)
        return outcome.exit_code
    console.print("\n" + "\n".join(outcome.summary()), markup=False, highlight=False)
    if outcome.interrupted:
        console.print(f"interrupted: run the same command again to resume the "
                      f"{outcome.interrupted} unfinished cells (finished ones are not re-run)")
    _print_results(sweep, None, limit=15)
    _print_ui_hint(tracking_uri, outcome.experiment_id, spec)
    from hpsweep.store.storage import open_storage

    console.print(f"runs: {tracking_uri} (experiment {spec.name!r}); checkpoints: "
                  f"{open_storage(storage, args.s3_endpoint).uri}", markup=False)
    return outcome.exit_code


def cmd_status(args) -> int:
    if args.address:
        from hpsweep.cluster.jobs import job_status

        return job_status(args.address, args.sweep)
    if not args.sweep:
        raise UsageError("status: give a sweep file (or --address URL [JOB] for cluster jobs)")
    from hpsweep.views.tables import status_table

    sweep = _sweep(args)
    state = sweep.state()
    matrix = state.matrix
    console.print(status_table(matrix, f"{sweep.name}: completeness", limit=args.limit))
    counts = matrix.counts
    console.print("  ".join(f"{k} {v}" for k, v in counts.items() if v or k not in ("stale", "stopped"))
                  + f"  (of {matrix.total} cells)")
    _print_failures(matrix, state.runs)
    stopped = [c for c in matrix.cells if c.state == "stopped"]
    if stopped:
        console.print(f"{len(stopped)} cells stopped early by the scheduler: "
                      + ", ".join(_stopped_text(sweep, state.runs.cells.get(c.cell_id)) for c in stopped[:5])
                      + (" ..." if len(stopped) > 5 else ""), markup=False)
    if matrix.orphans:
        console.print(f"{len(matrix.orphans)} runs belong to cells this file no longer produces")
    if counts.get("stale"):
        console.print(f"[magenta]{counts['stale']} cells are RUNNING in MLflow but no driver holds their "
                      f"lease in {state.storage}[/]: their driver was killed. `hpsweep run {args.sweep}` "
                      "resumes them from their last checkpoints.")
    by_owner: dict[str, int] = {}
    for lease in state.held.values():
        by_owner[lease.owner] = by_owner.get(lease.owner, 0) + 1
    for owner, n in sorted(by_owner.items()):
        console.print(f"running by driver {owner}: {n} cells (leases held)")
    if state.runs.waiting:
        since, _, message = state.runs.waiting.partition(" ")
        console.print(f"[magenta]{message}[/] (waiting {_ago(since)}; the driver stops after its "
                      "--node-wait, leaving the cells pending)")
    return 0


def _print_failures(matrix, runs) -> None:
    """Why the failed cells failed: each distinct reason once, with a cell it hit and how many."""
    from rich.markup import escape

    from hpsweep.fmt import fmt_params

    reasons: dict[str, list] = {}
    for c in matrix.cells:
        if c.state == "failed" and c.cell_id in runs.cells:
            reasons.setdefault(runs.cells[c.cell_id].error or "(no reason recorded)", []).append(c)
    for reason, cells in reasons.items():
        shown = fmt_params(cells[0].params)
        more = f" and {len(cells) - 1} more" if len(cells) > 1 else ""
        console.print(f"[red]failed[/]: cell {cells[0].cell_id} ({shown} seed={cells[0].seed}){more}: {escape(reason)}",
                      highlight=False)


def _ago(epoch: str) -> str:
    import time

    try:
        return f"{max(0.0, time.time() - float(epoch)):.0f}s"
    except ValueError:
        return "for a while"


def _stopped_text(sweep, run) -> str:
    step = run.steps.get(sweep.metric) if run else None
    top = sweep.spec.scheduler.max_t if sweep.spec.scheduler.type == "asha" else None
    return f"stopped at step {step if step is not None else '?'}" + (f" of {top}" if top else "")


def _sweep(args, path: str | None = None):
    from hpsweep.api import load

    return load(path or args.sweep, tracking_uri=args.tracking_uri, storage=getattr(args, "storage", None),
                s3_endpoint=getattr(args, "s3_endpoint", None), overrides=getattr(args, "overrides", None) or ())


def cmd_results(args) -> int:
    sweep = _sweep(args)
    group_by = [g.strip() for g in args.group_by.split(",")] if args.group_by else None
    fmt = "json" if args.json else args.format
    _print_results(sweep, group_by, limit=args.limit, metric=args.metric, fmt=fmt, cells=args.cells)
    return 0


def cmd_history(args) -> int:
    sweep = _sweep(args)
    rows = sweep.history_rows(args.metric)
    if not rows:
        known = sorted({k for c in sweep.runs().cells.values() for k in c.metrics})
        raise UsageError(f"history: no cell of {args.sweep} reported {args.metric!r}"
                         + (f"; reported: {', '.join(known)}" if known else " (no finished runs yet)"))
    _emit(rows, args.format, f"{sweep.name}: {args.metric}")
    return 0


def cmd_list(args) -> int:
    from hpsweep.api import sweeps_rows

    rows = sweeps_rows(args.tracking_uri)
    if not rows and args.format == "table":
        console.print("no sweeps in this tracking store")
        return 0
    _emit(rows, args.format, "sweeps")
    return 0


def cmd_report(args) -> int:
    from hpsweep.store.mlflow import resolve_tracking_uri
    from hpsweep.views.report import build_reports

    specs = [_load(path, args) for path in args.sweeps]
    names = [spec.name for spec in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"report: the sweep {', '.join(map(repr, twice))} is named more than once; "
                         "give each sweep file once")
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    _check_tracking(tracking_uri)
    out = Path(args.out or f".hpsweep/reports/{'+'.join(names)}")
    html, md = build_reports(tracking_uri, specs, out)
    console.print(f"report: {html}\n        {md}")
    return 0


def cmd_ui(args) -> int:
    """The MLflow UI on the local store (:func:`hpsweep.api.serve_ui`), with the sweep's link."""
    from hpsweep.api import serve_ui
    from hpsweep.store.mlflow import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    sweep = _sweep(args) if args.sweep else None
    if uri.startswith("http"):
        console.print(f"the tracking server is already a UI: open {sweep.url(uri) if sweep else uri}", markup=False)
        return 0
    address = f"http://{args.host}:{args.port}"
    link = sweep.url(address) if sweep else None  # before the server starts: a sweep never run says so

    def ready() -> None:
        console.print(f"MLflow UI: {address}  (Ctrl-C to stop)", markup=False)
        if link:
            console.print(f"the sweep {sweep.name!r}: {link}", markup=False)

    console.print(f"starting the MLflow UI on {address} ...")
    return serve_ui(uri, args.host, args.port, ready)


def cmd_schema(args) -> int:
    from hpsweep.spec.model import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


# --- helpers --------------------------------------------------------------------------------

def _print_results(sweep, group_by, limit: int = 0, metric: str | None = None, fmt: str = "table",
                   cells: bool = False) -> None:
    from hpsweep.views.tables import results_table

    metric = metric or sweep.metric
    runs = sweep.runs()
    if cells:
        _emit(sweep.results_rows(metric, runs=runs), fmt, f"{sweep.name}: cells", limit)
        return
    if fmt == "table":
        groups = sweep.aggregate(metric, group_by, runs=runs)
        swept = [n for n in sweep.spec.swept_names() if n not in (group_by or sweep.spec.swept_names())]
        console.print(results_table(groups, metric, sweep.spec.metric.mode, f"{sweep.name}: results",
                                    limit=limit, pooled=swept))
        return
    _emit(sweep.aggregate_rows(metric, group_by, runs=runs), fmt, f"{sweep.name}: results", limit)


def _emit(rows: list[dict], fmt: str, title: str, limit: int = 0) -> None:
    from hpsweep.views.tables import emit_rows

    emit_rows(rows, fmt, title, console, limit)


def _print_ui_hint(tracking_uri: str, experiment_id: str, spec) -> None:
    from hpsweep.store.mlflow import experiment_url

    def url(ui: str) -> str:
        return experiment_url(ui, experiment_id, spec.metric.name, spec.metric.mode)

    if tracking_uri.startswith("http"):
        console.print(f"browse the runs: {url(tracking_uri)}")
    else:
        console.print(f"browse the runs: hpsweep ui   (then {url('http://127.0.0.1:5000')})")


def _check_tracking(uri: str) -> None:
    """Fail fast, before Ray starts, when a tracking server is not there."""
    from hpsweep.api import check_tracking

    check_tracking(uri)


# --- the parser -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpsweep", description="Run hyperparameter sweeps with Ray Tune, tracked in MLflow.")
    parser.add_argument("--version", action="version", version=f"hpsweep {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("validate", help="check sweep files; nothing is run")
    p.add_argument("sweeps", nargs="+", metavar="SWEEP.yaml")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run a sweep's unfinished cells (locally, or on --address)")
    p.add_argument("sweep", metavar="SWEEP.yaml")
    _add_tracking(p)
    p.add_argument("--storage", default=None,
                   help="checkpoints and Tune state: a directory or s3://bucket/prefix "
                        "(default: $HPSWEEP_STORAGE, else .hpsweep/storage)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: in-process Ray)")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--no-live", action="store_true", help="print a line per trial instead of a live table")
    p.add_argument("--allow-local-store", action="store_true",
                   help="with --address: allow a local tracking file or storage directory on a "
                        "multi-node cluster (only when that disk is shared by every node and kept)")
    p.add_argument("--node-wait", type=float, default=None, metavar="SECONDS",
                   help="with --address: how long to wait for a node that can hold a trial (one an "
                        "autoscaler may start) before stopping with the cells pending "
                        "(default: $HPSWEEP_NODE_WAIT, else 1800)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="the completeness matrix of a sweep; or cluster jobs with --address")
    p.add_argument("sweep", nargs="?", metavar="SWEEP.yaml|JOB")
    _add_tracking(p)
    p.add_argument("--address", default=None, help="Ray dashboard address: show job status instead")
    p.add_argument("--limit", type=int, default=60, help="rows shown (0: all)")
    p.add_argument("--storage", default=None, help="where the sweep's cell leases live: cells a "
                   "driver holds show as running (default: $HPSWEEP_STORAGE, else .hpsweep/storage)")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("results", help="the sweep metric over seeds: mean, std, n")
    p.add_argument("sweep", metavar="SWEEP.yaml")
    _add_tracking(p)
    p.add_argument("--group-by", default=None, metavar="P1,P2", help="aggregate over the other parameters too")
    p.add_argument("--metric", default=None, help="another reported metric than the sweep's")
    p.add_argument("--limit", type=int, default=0, help="rows shown (0: all)")
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="table (default), csv, json or markdown; all but the table print numbers in full")
    p.add_argument("--cells", action="store_true",
                   help="one row per cell (its values, seed, state, run id, step, final metrics) "
                        "instead of the aggregate over seeds")
    p.add_argument("--json", action="store_true", help="the same as --format json")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("history", help="a metric's history, a row per cell and step (CSV by default)")
    p.add_argument("sweep", metavar="SWEEP.yaml")
    p.add_argument("metric", metavar="METRIC")
    _add_tracking(p)
    p.add_argument("--format", choices=FORMATS, default="csv", help="csv (default), json, markdown or table")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("list", help="the sweeps in the tracking store, with their cells counted by state")
    _add_tracking(p)
    p.add_argument("--format", choices=FORMATS, default="table", help="table (default), csv, json or markdown")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("report", help="HTML + Markdown report: tables, figures, the paper's claims "
                       "(several sweeps: one page, one claims table)")
    p.add_argument("sweeps", metavar="SWEEP.yaml", nargs="+")
    _add_tracking(p)
    p.add_argument("--out", default=None, help="output directory (default .hpsweep/reports/NAME[+NAME...])")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("ui", help="the MLflow UI on the local tracking store (and a sweep's link)")
    p.add_argument("sweep", nargs="?", metavar="SWEEP.yaml", help="print the link to this sweep's cells")
    _add_tracking(p)
    p.add_argument("--host", default="127.0.0.1", help="address the UI listens on (default 127.0.0.1: "
                   "this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port of the UI (default 5000)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("schema", help="print the JSON Schema of sweep files")
    p.set_defaults(func=cmd_schema)

    from hpsweep.cluster import jobs as cluster  # submit | logs | stop | render: the Ray Jobs side

    cluster.register(sub)
    _add_overrides(sub)
    from hpsweep import scaffold  # new trainer NAME [--command]

    scaffold.register(sub)
    return parser


def _print_user_error(exc: UserError, debug: bool) -> int:
    """The one printer of user errors: the message on stderr, no traceback (unless
    ``--debug``); returns the exit code (2)."""
    if debug:
        traceback.print_exception(exc)
    err_console.print(str(exc), markup=False)
    return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    # MLflow's INFO lines (schema migrations of a new SQLite store) are not for the console.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        return _print_user_error(exc, args.debug)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as exc:  # a bug or an environment problem: one line, --debug for more
        if args.debug:
            raise
        err_console.print(f"error: {type(exc).__name__}: {exc}\n(run with --debug for the traceback)",
                          markup=False)
        return 1


def entry() -> None:
    """The ``hpsweep`` command: :func:`main`, then out without waiting for in-process Ray's
    shutdown (see :func:`hpsweep.run.localray.leave`)."""
    code = main()
    if "hpsweep.run.localray" in sys.modules:  # imported by a command that ran trials
        sys.modules["hpsweep.run.localray"].leave(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
