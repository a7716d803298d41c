"""hpsweep from Python: a sweep as data, for a notebook or a script.

    import hpsweep
    sweep = hpsweep.load("sweeps/quickstart.yaml")   # tracking and storage as the CLI resolves them
    sweep.status()                 # DataFrame: a row per cell (params, seed, state, run id, attempts, ...)
    sweep.results()                # DataFrame: a row per cell with its final metrics
    sweep.results().aggregate()    # the sweep metric over seeds: mean, std, n, missing (as `hpsweep results`)
    sweep.history("loss")          # long DataFrame: cell, params, seed, step, value
    sweep.run()                    # what `hpsweep run` does
    hpsweep.sweeps()               # the sweeps in the tracking store

The read commands of the CLI (``status``, ``results``, ``history``, ``list``) are shells over
the ``*_rows`` methods here, so the two cannot disagree. Rows are plain dicts (what the CLI
prints); the DataFrame methods import pandas only when called: ``import hpsweep`` and the
reads import neither Ray, torch, pandas nor (for the default SQLite store and a tracking server
without credentials) MLflow's client.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpsweep.errors import UsageError

__all__ = ["load", "Sweep", "sweeps", "sweeps_rows", "Status", "results_class", "serve_ui"]


def load(path: str | Path, *, tracking_uri: str | None = None, storage: str | None = None,
         s3_endpoint: str | None = None, overrides: Sequence[str] = ()) -> Sweep:
    """The sweep of file ``path`` (checked as ``hpsweep validate`` checks it: a
    :class:`hpsweep.errors.UserError` lists every problem). ``tracking_uri``: else
    ``$MLFLOW_TRACKING_URI``, else SQLite under ``.hpsweep/`` of the current directory;
    ``storage`` (where leases and checkpoints are): else ``$HPSWEEP_STORAGE``, else the one the
    sweep's last driver used. ``overrides``: ``FIELD=VALUE`` strings, as ``--set`` gives them."""
    from hpsweep.spec.model import load_spec
    from hpsweep.store.mlflow import resolve_tracking_uri

    return Sweep(Path(path), load_spec(path, tuple(overrides)), resolve_tracking_uri(tracking_uri), storage,
                 s3_endpoint)


def sweeps_rows(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """The sweeps in a tracking store, each with its cell runs counted by state."""
    from hpsweep.store.mlflow import resolve_tracking_uri
    from hpsweep.store.runs import list_sweeps

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking(uri)
    return list_sweeps(uri)


def sweeps(tracking_uri: str | None = None):
    """:func:`sweeps_rows` as a DataFrame."""
    return _frame(sweeps_rows(tracking_uri))


class Status:
    """What ``hpsweep status`` shows: the completeness matrix seen through the leases, the
    cells' runs, where the leases were read and who holds them."""

    def __init__(self, matrix, runs, storage: str, held: dict) -> None:
        self.matrix, self.runs, self.storage, self.held = matrix, runs, storage, held


class Sweep:
    """One sweep file and where its runs are. Every method reads afresh."""

    def __init__(self, path: Path, spec, tracking_uri: str, storage: str | None,
                 s3_endpoint: str | None) -> None:
        self.path, self.spec, self.tracking_uri = path, spec, tracking_uri
        self.storage, self.s3_endpoint = storage, s3_endpoint

    def __repr__(self) -> str:
        return f"<hpsweep.Sweep {self.name!r} from {self.path}, runs in {self.tracking_uri}>"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def metric(self) -> str:
        return self.spec.metric.name

    def cells(self) -> list:
        """The planned cells (``.id``, ``.params``, ``.seed``, ``.config``); empty for an optuna search."""
        from hpsweep.spec.plan import plan

        return plan(self.spec)

    def runs(self, histories: bool | list[str] = False):
        """Every cell run of the sweep (:class:`hpsweep.store.runs.SweepRuns`)."""
        from hpsweep.store.runs import load_sweep

        check_tracking(self.tracking_uri)
        return load_sweep(self.tracking_uri, self.name, histories)

    # -- status -------------------------------------------------------------------------------

    def state(self) -> Status:
        """The completeness matrix: each planned cell done / stopped / running / failed /
        pending / stale. A local SQLite store is read in full (it is cheap); elsewhere the
        sweep's finished index answers for the finished cells and MLflow for the rest."""
        from hpsweep.store.readers import SqliteReader, reader_for
        from hpsweep.store.runs import load_states, load_sweep
        from hpsweep.views.stats import completeness
        from hpsweep.views.tables import with_leases

        check_tracking(self.tracking_uri)
        cells = self.cells()
        runs = None
        if cells and not isinstance(reader_for(self.tracking_uri), SqliteReader):
            runs = load_states(self.tracking_uri, self.name, [c.id for c in cells], self._index)
        runs = runs or load_sweep(self.tracking_uri, self.name)
        matrix = completeness(cells, runs)
        from hpsweep.store.storage import DEFAULT_STORAGE

        storage = self.storage or os.environ.get("HPSWEEP_STORAGE") or runs.storage or DEFAULT_STORAGE
        held = self._held(storage, [c.cell_id for c in matrix.cells if c.state not in ("done", "stopped")])
        matrix = with_leases(matrix, {k: lease.owner for k, lease in held.items()})
        return Status(matrix, runs, storage, held)

    def status_rows(self, state: Status | None = None) -> list[dict[str, Any]]:
        """A row per planned cell: its swept values, seed, state, run id, attempts, duration
        (s), the step its sweep metric reached, the driver holding its lease, and a failed
        cell's reason (the trainer's exception)."""
        state = state or self.state()
        rows = []
        for c in state.matrix.cells:
            run = state.runs.cells.get(c.cell_id)
            lease = state.held.get(c.cell_id)
            rows.append({"cell_id": c.cell_id, **c.params, "seed": c.seed, "state": c.state,
                         "run_id": run.run_id if run and run.run_id else None,
                         "attempts": run.attempts if run else None,
                         "duration_s": run.duration_s if run else None,
                         "step": run.steps.get(self.metric) if run else None,
                         "held_by": lease.owner if lease else None,
                         "error": (run.error or None) if run and c.state == "failed" else None})
        return rows

    def status(self):
        """:meth:`status_rows` as a DataFrame."""
        return _frame(self.status_rows())

    # -- results ------------------------------------------------------------------------------

    def observations(self, runs=None) -> list:
        from hpsweep.views.stats import observations

        return observations(self.cells() or None, runs or self.runs())  # optuna: whatever ran

    def results_rows(self, metric: str | None = None, runs=None) -> list[dict[str, Any]]:
        """A row per cell: swept values, seed, state, run id, every final metric, and the step
        that ``metric`` (default the sweep's) comes from."""
        metric = metric or self.metric
        obs = self.observations(runs)
        names = sorted({k for o in obs for k in o.metrics})
        return [{"cell_id": o.cell_id, **o.params, "state": o.state, "run_id": o.run_id,
                 "step": o.steps.get(metric), **{k: o.metrics.get(k) for k in names}} for o in obs]

    def aggregate_rows(self, metric: str | None = None, group_by: Sequence[str] | None = None,
                       runs=None) -> list[dict[str, Any]]:
        """``metric`` over the seeds of each configuration (or over every other parameter too,
        by ``group_by``), best first: what ``hpsweep results`` prints."""
        return [{**params, **_stat_row(s)} for params, s in self.aggregate(metric, group_by, runs)]

    def aggregate(self, metric: str | None = None, group_by: Sequence[str] | None = None, runs=None) -> list:
        """[(group's values, :class:`hpsweep.views.stats.Stat`)], best first."""
        from hpsweep.views.stats import aggregate

        if group_by:
            unknown = [g for g in group_by if g not in self.spec.swept_names()]
            if unknown:
                raise UsageError(f"--group-by: {', '.join(unknown)} not swept in {self.path}; "
                                 f"swept: {', '.join(self.spec.swept_names())}")
        return aggregate(self.observations(runs), metric or self.metric, self.spec.metric.mode,
                         list(group_by) if group_by else None)

    def results(self, metric: str | None = None):
        """:meth:`results_rows` as a DataFrame with an ``.aggregate()`` over seeds."""
        frame = _frame(self.results_rows(metric), results_class())
        frame.attrs.update(sweep=self.name, metric=metric or self.metric, mode=self.spec.metric.mode,
                           swept=[*self.spec.swept_names()])
        return frame

    # -- histories ----------------------------------------------------------------------------

    def history_rows(self, metric: str) -> list[dict[str, Any]]:
        """Long rows of ``metric``'s history: cell id, swept values, seed, state, step, value;
        by cell in plan order, then step."""
        runs = self.runs(histories=[metric])
        rows = []
        for o in self.observations(runs):
            run = runs.cells.get(o.cell_id)
            for step, value in (run.histories.get(metric, []) if run else []):
                rows.append({"cell_id": o.cell_id, **o.params, "state": o.state, "step": step, "value": value})
        return rows

    def history(self, metric: str):
        """:meth:`history_rows` as a DataFrame."""
        return _frame(self.history_rows(metric))

    # -- running ------------------------------------------------------------------------------

    def run(self, *, address: str | None = None, live: bool | None = False, console=None,
            node_wait: float | None = None, allow_local_store: bool = False):
        """Run the sweep's unfinished cells: what ``hpsweep run`` does, which calls this (in-process
        Ray unless ``address``, else ``$HPSWEEP_RAY_ADDRESS``); returns
        :class:`hpsweep.run.engine.SweepOutcome`. Every check comes first (requirements, the
        machine's resources or the cluster's, the tracking store, the storage, the data); a
        problem raises :class:`hpsweep.errors.UserError` with nothing started. ``node_wait``:
        seconds a cluster sweep waits for a node that can hold a trial. The caller's event loop
        (a notebook's) is left alone: this blocks until the sweep ends."""
        from hpsweep.run import localray, preflight, resources

        spec, sweep_file = self.spec, str(self.path)
        preflight.check_requirements(spec, sweep_file)
        address = address or os.environ.get("HPSWEEP_RAY_ADDRESS")
        if not address:  # in-process Ray: a trial this machine cannot hold fails before anything
            resources.check_local(spec)
        check_tracking(self.tracking_uri)
        storage = self.storage or os.environ.get("HPSWEEP_STORAGE")
        check_storage(storage, self.s3_endpoint)
        preflight.check_data(spec, sweep_file)
        wait_s = resources.node_wait(node_wait)
        ray_start = None
        if address:
            if not allow_local_store:
                preflight.check_cluster_store(address, self.tracking_uri, storage)
            localray.init(address, localray.ray_env())   # join: a trial no node can hold fails here
            localray.own_signals()
            resources.check_cluster(spec, address)
        else:  # Ray starts while the engine is imported and reads the sweep's state
            from hpsweep.spec.plan import plan
            from hpsweep.store.storage import open_storage

            ray_start = localray.begin([c.id for c in plan(spec)], open_storage(storage, self.s3_endpoint))
        from hpsweep.run.engine import run_sweep

        return run_sweep(spec, self.path.read_text(encoding="utf-8"), tracking_uri=self.tracking_uri,
                         storage_uri=storage, address=address, s3_endpoint=self.s3_endpoint, live=live,
                         console=console, ray_start=ray_start, node_wait=wait_s)

    def url(self, ui: str | None = None, experiment_id: str | None = None) -> str:
        """The MLflow UI page of the sweep's cells (``ui``: the UI's address; default the
        tracking server, or ``http://127.0.0.1:5000`` where ``hpsweep ui`` serves a local store)."""
        from hpsweep.store.mlflow import VIEW_KEY, VIEW_TAG, experiment_url
        from hpsweep.store.readers import reader_for

        view = True
        ui = ui or (self.tracking_uri if self.tracking_uri.startswith("http") else "http://127.0.0.1:5000")
        if experiment_id is None:
            reader = reader_for(self.tracking_uri)
            if reader is None:
                from hpsweep.store.mlflow import mlflow_client

                reader = mlflow_client(self.tracking_uri)
            exp = reader.get_experiment_by_name(self.name)
            experiment_id = exp.experiment_id if exp else None
            view = exp is not None and (VIEW_TAG + VIEW_KEY) in exp.tags  # a sweep run before views: sorted only
        if experiment_id is None:
            raise UsageError(f"{self.path}: the sweep {self.name!r} has no runs in {self.tracking_uri} yet; "
                             f"run it first: hpsweep run {self.path}")
        return experiment_url(ui, experiment_id, self.metric, self.spec.metric.mode, view=view)

    # -- where the leases are -------------------------------------------------------------------

    def _index(self, uri: str):
        """The storage of the sweep's finished index (None: a directory that is gone)."""
        from hpsweep.store.storage import open_storage

        if not uri.startswith("s3://") and not Path(uri).is_dir():
            return None
        check_storage(uri, self.s3_endpoint)
        return open_storage(uri, self.s3_endpoint)

    def _held(self, uri: str, cell_ids: list[str]) -> dict:
        """Live leases on ``cell_ids`` in storage ``uri`` (none if it does not exist yet)."""
        if not cell_ids or (not uri.startswith("s3://") and not Path(uri).is_dir()):
            return {}
        from hpsweep.store.storage import open_storage

        check_storage(uri, self.s3_endpoint)
        return open_storage(uri, self.s3_endpoint).live_leases(cell_ids)


def _stat_row(s) -> dict[str, Any]:
    return {"mean": None if s.n == 0 else s.mean, "std": None if math.isnan(s.std) else s.std,
            "n": s.n, "missing": s.missing, "step": s.step_text() or None, "stopped": s.stopped}


def check_tracking(uri: str) -> None:
    """Fail fast (a :class:`hpsweep.errors.UserError`) on a tracking URI MLflow cannot use, or
    a tracking server that does not answer."""
    from hpsweep.errors import TrackingUnreachable
    from hpsweep.run.preflight import check_tracking_uri

    check_tracking_uri(uri)
    if not uri.startswith("http"):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).read()
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingUnreachable(f"--tracking-uri {uri}: no MLflow server answers there ({exc}); "
                                  "start one with `mlflow server` or leave the flag out for local SQLite") from None


def check_storage(uri: str | None, endpoint: str | None) -> None:
    """A local directory that cannot be written, or an S3 bucket that does not answer."""
    from hpsweep.run.preflight import check_local_storage

    check_local_storage(uri)
    if not uri or not uri.startswith("s3://"):
        return
    from hpsweep.store.storage import open_storage

    open_storage(uri, endpoint).check_reachable()


def serve_ui(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000, ready=None) -> int:
    """Serve the MLflow UI on a local store until Ctrl-C or SIGTERM: ``mlflow server`` with its
    job runner off (hpsweep starts no GenAI jobs; on, it is a dozen more processes of about
    240 MB), in a process group of its own that is stopped as one; ``ready()`` is called once
    the server answers. Returns the server's exit code (0 when stopped)."""
    import shutil
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    address = f"http://{host}:{port}"
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow, "server", "--backend-store-uri", tracking_uri, "--host", host, "--port", str(port),
           "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if tracking_uri.startswith("sqlite:"):   # no pool: a running sweep writes the same file
        env.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    server = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while server.poll() is None:
            try:
                urllib.request.urlopen(f"{address}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise UsageError(f"ui: mlflow server exited with {server.returncode} before it answered "
                             f"(port {port} taken? try --port)")
        if ready is not None:
            ready()
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


# -- DataFrames (pandas imported only here) --------------------------------------------------------

def _frame(rows: list[dict[str, Any]], cls=None):
    import pandas as pd

    cls = cls or pd.DataFrame
    return cls.from_records(rows) if rows else cls()


def results_class():
    """The DataFrame class of :meth:`Sweep.results` (made once, when first asked: pandas is
    imported then)."""
    global _RESULTS
    if _RESULTS is None:
        _RESULTS = _make_results_class()
    return _RESULTS


_RESULTS = None


def _make_results_class():
    import pandas as pd

    class Results(pd.DataFrame):
        """A row per cell (``Sweep.results()``); :meth:`aggregate` with no function gives the
        sweep metric (or ``metric``) over seeds per configuration, as ``hpsweep results``;
        with a function it is pandas' own ``DataFrame.aggregate``."""

        _metadata = []

        @property
        def _constructor(self):
            return Results

        def aggregate(self, func=None, axis=0, *args, metric: str | None = None,
                      by: Sequence[str] | None = None, **kwargs):
            if func is not None:
                return pd.DataFrame(self).aggregate(func, axis, *args, **kwargs)
            from hpsweep.views.stats import Obs, aggregate

            metric = metric or self.attrs["metric"]
            swept = [n for n in self.attrs.get("swept", []) if n in self.columns]
            obs = [Obs(r["cell_id"], {n: _none(r[n]) for n in [*swept, "seed"]}, r["state"],
                       {} if _none(r.get(metric)) is None else {metric: float(r[metric])}, _none(r["run_id"]),
                       {} if _none(r["step"]) is None or metric != self.attrs["metric"] else {metric: int(r["step"])})
                   for r in self.to_dict("records")]
            groups = aggregate(obs, metric, self.attrs["mode"], list(by) if by else None)
            return pd.DataFrame.from_records([{**params, **_stat_row(s)} for params, s in groups])

        agg = pd.DataFrame.aggregate

    Results.__qualname__, Results.__module__ = "Results", __name__
    return Results


def _none(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v
