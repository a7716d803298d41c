"""The runs of a sweep read back from MLflow, in bulk, in the layout :mod:`hpsweep.store`
declares (its tag names, its client).

:func:`load_sweep` reads every cell run with ``search_runs`` (pages of 50,000) and,
when asked, metric histories; :func:`fetch_histories` reads the histories of chosen runs only
(what the report draws). Histories come from MLflow's bulk endpoint
``/ajax-api/2.0/mlflow/metrics/get-history-bulk`` (up to 100 runs a request, one SQL query each
on the server; requests in a thread pool) -- never one request per run per metric: measured
side by side on a local server, 300 runs' histories took 1.2 s in bulk against 16 s one request
a run with 8 threads (bench/report.py). A local SQL store is read through the store's own bulk
query. What the runs mean (completeness, means over seeds) is :mod:`hpsweep.views.stats`'s business.

Every read goes through a reader of :mod:`hpsweep.store.readers` where one can read the store
as it is (the default SQLite store with ``sqlite3``, a server without credentials through
REST), so that ``status``, ``results`` and ``history`` never import MLflow's client there; else
through MLflow's client. ``CellRun.status`` is ``stopped`` for a run the scheduler stopped early
(tag ``hpsweep.early_stopped``), and ``CellRun.steps`` gives the step of each final metric.

``status`` of a big sweep reads less: :func:`load_states` takes the finished cells from the
sweep's finished index (:mod:`hpsweep.store.storage`) and asks MLflow only about the rest.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hpsweep.store.mlflow import TAG, mlflow_client
from hpsweep.store.readers import reader_for

__all__ = ["CellRun", "SweepRuns", "STATES", "ENDED", "load_sweep", "load_states", "fetch_histories",
           "run_state", "list_sweeps"]

#: the states of a cell, in the order the reports list them. ``stopped``: FINISHED, but the
#: scheduler (ASHA) stopped it before its last step (its values are from an earlier step).
#: ``interrupted``: KILLED in MLflow (a Ctrl-C, a scheduler's stop not yet closed; the next
#: ``hpsweep run`` resumes it). ``stale``: RUNNING in MLflow but no driver holds its lease
#: (killed); only ``hpsweep status``, which reads the leases, says so
STATES = ("done", "stopped", "running", "failed", "interrupted", "pending", "stale")
#: the states of a cell whose run ended well: its final metrics count
ENDED = ("done", "stopped")
# search_runs page size: the server's cap. A page's cost is mostly a fixed scan of the
# experiment (measured: 1,000 runs of 6,000 take about as long as all 6,000), so pages of
# 1,000 made a 6,000-run sweep six times slower to read.
_PAGE = 50000
_BULK_RUNS = 100          # the server refuses more run ids per bulk-history request
_BULK_ROWS = 25000        # ... and returns at most this many rows per request
_THREADS = 8              # concurrent history requests (the server does the work in SQL)


def run_state(mlflow_status: str) -> str:
    """Map an MLflow run status to a cell state: done, running, interrupted or failed."""
    if mlflow_status == "FINISHED":
        return "done"
    if mlflow_status in ("RUNNING", "SCHEDULED"):
        return "running"
    if mlflow_status == "KILLED":
        return "interrupted"
    return "failed"


@dataclasses.dataclass(frozen=True)
class CellRun:
    """One cell's run as read back from MLflow.

    ``params`` are the swept values (from the ``hpsweep.params`` tag, typed as JSON gave them);
    ``config`` is the full resolved trainer config as MLflow stores params (strings);
    ``metrics`` are the final (latest step) values; ``histories`` maps a metric name to its
    ``[(step, value), ...]`` sorted by step, for the metrics that were asked for.
    """

    cell_id: str
    run_id: str
    status: str                 # done | running | interrupted | failed
    mlflow_status: str          # FINISHED | RUNNING | FAILED | KILLED | SCHEDULED
    seed: int | None
    params: dict[str, Any]
    config: dict[str, str]
    metrics: dict[str, float]
    histories: dict[str, list[tuple[int, float]]]
    start_time: int | None
    end_time: int | None
    duplicates: int = 0         # other runs found for the same cell (crashes, re-runs)
    code_version: str = ""      # the git sha (``+dirty``) the cell's trainer ran
    error: str = ""             # a failed run's reason (the trainer's exception, its first line)
    steps: dict[str, int] = dataclasses.field(default_factory=dict)  # the step of each final metric
    attempts: int | None = None  # times the cell was started (its run's tag), when known
    early_stopped: bool = False  # stopped by the scheduler (status ``stopped``)

    @property
    def duration_s(self) -> float | None:
        """Seconds from the run's start to its end (None while it runs)."""
        if self.start_time is None or self.end_time is None:
            return None
        return (self.end_time - self.start_time) / 1000.0


@dataclasses.dataclass(frozen=True)
class SweepRuns:
    """Every cell run of one sweep, keyed by cell id, plus where they live."""

    sweep_name: str
    tracking_uri: str | None
    experiment_id: str | None
    parent_run_id: str | None
    cells: dict[str, CellRun]
    fetch_seconds: float = 0.0
    storage: str | None = None      # the storage the sweep's last driver used (its parent's tag)
    waiting: str | None = None      # what its running driver waits for: "<since epoch s> <message>"

    def metric_names(self) -> list[str]:
        """Every metric name any cell reported, sorted."""
        return sorted({k for c in self.cells.values() for k in c.metrics})


def _search_all(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string=filter_string, max_results=_PAGE, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _pick(candidates: list) -> tuple[Any, int]:
    """Prefer a FINISHED run; else the newest. Returns (run, number of others)."""
    finished = [r for r in candidates if r.info.status == "FINISHED"]
    pool = finished or candidates
    best = max(pool, key=lambda r: (r.info.start_time or 0, r.info.run_id))
    return best, len(candidates) - 1


def _to_cell(run, duplicates: int) -> CellRun:
    tags = run.data.tags
    try:
        params = json.loads(tags.get(TAG["params"], "{}"))
    except json.JSONDecodeError:
        params = {}
    seed_tag = tags.get(TAG["seed"])
    try:
        seed = int(seed_tag) if seed_tag is not None else None
    except ValueError:
        seed = None
    try:
        attempts = int(tags[TAG["attempts"]]) if TAG["attempts"] in tags else None
    except ValueError:
        attempts = None
    early = tags.get(TAG["early"]) == "true" and run.info.status == "FINISHED"
    # the readers give each final metric's step; MLflow's client keeps them on its metric objects
    steps = getattr(run.data, "steps", None)
    if steps is None:
        steps = {m.key: m.step for m in getattr(run.data, "_metric_objs", ())}
    return CellRun(
        cell_id=tags[TAG["cell"]],
        run_id=run.info.run_id,
        status="stopped" if early else run_state(run.info.status),
        mlflow_status=run.info.status,
        seed=seed,
        params=params if isinstance(params, dict) else {},
        config=dict(run.data.params),
        metrics=dict(run.data.metrics),
        histories={},
        start_time=run.info.start_time,
        end_time=run.info.end_time,
        duplicates=duplicates,
        code_version=tags.get(TAG["code"], ""),
        error=tags.get(TAG["error"], ""),
        steps=dict(steps),
        attempts=attempts,
        early_stopped=early,
    )


# -- metric histories ------------------------------------------------------------------------

def _history_fetcher(client):
    """A function (run_ids, key) -> [(run_id, step, value, timestamp)] using the best bulk path.

    Against a tracking server: the ``metrics/get-history-bulk`` REST route (100 runs a request,
    one SQL query on the server). Against a local SQL store: the store's own bulk query. Any
    other store: ``get_metric_history`` per run (used in a thread pool by the caller).
    """
    # Private routes, kept for speed: MLflow has no public bulk-history call (only
    # ``get_metric_history``, one run a request), and no public accessor of the client's store.
    # bench/report.py measures the difference side by side: 300 runs' histories in bulk 1.2 s,
    # one request a run (8 threads) 16 s.
    if hasattr(client, "metric_history_bulk"):  # a reader of hpsweep.store.readers
        return (lambda run_ids, key: client.metric_history_bulk(run_ids, key, _BULK_ROWS)), True
    store = client._tracking_client.store
    if hasattr(store, "get_host_creds"):
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        endpoint = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"

        def fetch_rest(run_ids: Sequence[str], key: str):
            resp = http_request(
                store.get_host_creds(), endpoint, "GET",
                params={"run_id": list(run_ids), "metric_key": key, "max_results": _BULK_ROWS},
            )
            verify_rest_response(resp, endpoint)
            return [
                (m["run_id"], int(m.get("step", 0)), float(m["value"]), int(m.get("timestamp", 0)))
                for m in resp.json().get("metrics", [])
            ]

        return fetch_rest, True
    if hasattr(store, "get_metric_history_bulk"):
        def fetch_sql(run_ids: Sequence[str], key: str):
            return [
                (m.run_id, m.step, m.value, m.timestamp)
                for m in store.get_metric_history_bulk(list(run_ids), key, _BULK_ROWS)
            ]

        return fetch_sql, True

    def fetch_each(run_ids: Sequence[str], key: str):
        return [
            (rid, m.step, m.value, m.timestamp)
            for rid in run_ids for m in client.get_metric_history(rid, key)
        ]

    return fetch_each, False


def _fetch_batch(fetch, run_ids: list[str], key: str, bulk: bool):
    rows = fetch(run_ids, key)
    if bulk and len(rows) >= _BULK_ROWS and len(run_ids) > 1:
        # The server truncated: split the batch until each answer fits.
        half = len(run_ids) // 2
        return _fetch_batch(fetch, run_ids[:half], key, bulk) + _fetch_batch(
            fetch, run_ids[half:], key, bulk
        )
    return rows


def _histories(client, runs: Mapping[str, set[str]]) -> dict[str, dict[str, list]]:
    """runs: metric key -> run ids that have it. Returns run_id -> key -> [(step, value)]."""
    fetch, bulk = _history_fetcher(client)
    size = _BULK_RUNS if bulk else 1
    jobs = []
    for key, ids in runs.items():
        ordered = sorted(ids)
        jobs += [(ordered[i:i + size], key) for i in range(0, len(ordered), size)]
    out: dict[str, dict[str, list]] = {}
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        rows_per_job = pool.map(lambda j: _fetch_batch(fetch, j[0], j[1], bulk), jobs)
        for (_ids, key), rows in zip(jobs, rows_per_job, strict=True):
            # Several values at one step (a resumed trial re-reporting): keep the latest write.
            latest: dict[tuple[str, int], tuple[int, float]] = {}
            for run_id, step, value, ts in rows:
                prev = latest.get((run_id, step))
                if prev is None or ts >= prev[0]:
                    latest[(run_id, step)] = (ts, value)
            for (run_id, step), (_, value) in latest.items():
                out.setdefault(run_id, {}).setdefault(key, []).append((step, value))
    for per_run in out.values():
        for series in per_run.values():
            series.sort()
    return out


# -- the public entry points -----------------------------------------------------------------

def load_sweep(
    tracking_uri: str | None, sweep_name: str, histories: bool | list[str] = False
) -> SweepRuns:
    """Read every cell run of sweep ``sweep_name`` from MLflow at ``tracking_uri``.

    ``histories``: ``False`` reads final metrics only (fast: search_runs pages alone);
    ``True`` also reads the full history of every metric; a list reads only those metrics'
    histories (``fnmatch`` patterns allowed: ``["valid/*"]``). When several runs carry the
    same cell id (a crash and a re-run), the FINISHED one is kept, else the newest;
    ``CellRun.duplicates`` counts the others.

    A sweep that was never tracked (no experiment) gives a ``SweepRuns`` with no cells, so
    that ``status`` of a not-yet-started sweep shows every cell pending.
    """
    t0 = time.perf_counter()
    client = reader_for(tracking_uri) or mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(sweep_name)
    if exp is None:
        return SweepRuns(sweep_name, tracking_uri, None, None, {}, time.perf_counter() - t0)
    eid = exp.experiment_id
    base = f"tags.`{TAG['sweep']}` = '{sweep_name}'"
    parents = _search_all(client, [eid], f"{base} and tags.`{TAG['role']}` = 'sweep'")
    parent = max(parents, key=lambda r: r.info.start_time or 0) if parents else None
    parent_id = parent.info.run_id if parent else None
    by_cell: dict[str, list] = {}
    for run in _search_all(client, [eid], f"{base} and tags.`{TAG['role']}` = 'cell'"):
        if TAG["cell"] in run.data.tags:
            by_cell.setdefault(run.data.tags[TAG["cell"]], []).append(run)
    cells = {}
    for cell_id, cands in by_cell.items():
        run, dups = _pick(cands)
        cells[cell_id] = _to_cell(run, dups)
    runs = SweepRuns(sweep_name, tracking_uri, eid, parent_id, cells, 0.0,
                     parent.data.tags.get(TAG["storage"]) if parent else None, _waiting(parent))
    if histories:
        wanted: dict[str, set[str]] = {}
        for c in cells.values():
            keys = c.metrics.keys() if histories is True else [
                k for k in c.metrics if any(fnmatch.fnmatchcase(k, pat) for pat in histories)]
            for k in keys:
                wanted.setdefault(k, set()).add(c.run_id)
        runs = fetch_histories(runs, wanted, client=client)
    return dataclasses.replace(runs, fetch_seconds=time.perf_counter() - t0)


def load_states(tracking_uri: str | None, sweep_name: str, planned: Iterable[str],
                open_index: Callable[[str], Any]) -> SweepRuns | None:
    """Each cell's state (done, running, failed; no params, no metrics) for ``status``: the
    sweep's finished index says which cells are done, and MLflow is asked only about the rest
    -- the runs that are not FINISHED (one search, small once a sweep is done), those the
    scheduler stopped early (one search), and the planned
    cells that a lease says something ran but that have no mark (a search each up to 20, else
    one read of the sweep's finished runs). ``open_index(uri)`` opens the storage that the
    experiment's index tag names (None: it is gone). None when the sweep has no index to trust
    (never tracked, made before the index, run with several storages, or an index that is gone
    or empty beside finished runs): :func:`load_sweep` reads it.

    Why a planned cell with no mark, no unfinished run and no lease record has no run: every
    driver of the sweep uses the index's storage (one with another storage marks the sweep
    ``mixed``), every runner holds the cell's lease there before it creates a run, and marks
    the cell after its run is FINISHED (a driver marks what it finds finished without one).
    A run deleted in the MLflow UI keeps its mark: ``status`` shows it done until a rerun."""
    t0 = time.perf_counter()
    client = reader_for(tracking_uri) or mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(sweep_name)
    if exp is None or exp.lifecycle_stage == "deleted":
        return None
    key, _, uri = exp.tags.get(TAG["index"], "").partition(" ")
    if not uri:
        return None
    storage = open_index(uri)
    if storage is None:
        return None
    eid = exp.experiment_id
    base = f"tags.`{TAG['sweep']}` = '{sweep_name}' and tags.`{TAG['role']}`"
    marks = storage.finished_marks(key)
    if not marks and client.search_runs([eid], f"{base} = 'cell' and attributes.status = 'FINISHED'",
                                        max_results=1):
        return None  # finished runs but no marks: the storage was emptied or replaced
    parents = _search_all(client, [eid], f"{base} = 'sweep'")
    parent = max(parents, key=lambda r: r.info.start_time or 0) if parents else None
    by_cell: dict[str, list] = {}

    def add(run) -> None:
        if TAG["cell"] in run.data.tags:
            by_cell.setdefault(run.data.tags[TAG["cell"]], []).append(run)

    for run in _search_all(client, [eid], f"{base} = 'cell' and attributes.status != 'FINISHED'"):
        add(run)
    # the cells the scheduler stopped early: finished and marked, but shown as stopped
    for run in _search_all(client, [eid], f"{base} = 'cell' and tags.`{TAG['early']}` = 'true'"):
        add(run)
    held = storage.lease_keys()
    ran = [c for c in planned if c not in marks and c not in by_cell and c in held]
    ran = [c for c in ran if not ((lease := storage.read_lease(c)) is not None and lease.live)]
    if len(ran) > _STATE_SEARCHES:
        wanted = set(ran)
        for run in _search_all(client, [eid], f"{base} = 'cell' and attributes.status = 'FINISHED'"):
            if run.data.tags.get(TAG["cell"]) in wanted:
                add(run)
    else:
        for cid in ran:
            for run in client.search_runs([eid], f"{base} = 'cell' and tags.`{TAG['cell']}` = '{cid}' "
                                          "and attributes.status = 'FINISHED'", max_results=1):
                add(run)
    cells = {cid: _pick_cell(cands) for cid, cands in by_cell.items()}
    for cid in marks:
        if cid not in cells or cells[cid].status not in ENDED:
            cells[cid] = CellRun(cid, "", "done", "FINISHED", None, {}, {}, {}, {}, None, None)
    return SweepRuns(sweep_name, tracking_uri, eid, parent.info.run_id if parent else None, cells,
                     time.perf_counter() - t0, uri, _waiting(parent))


def _waiting(parent) -> str | None:
    """The sweep run's waiting tag while that run is RUNNING (a driver that stopped clears it,
    one that was killed leaves it behind a run that is not RUNNING for long: see ``stale``)."""
    if parent is None or parent.info.status != "RUNNING":
        return None
    return parent.data.tags.get(TAG["waiting"]) or None


def _pick_cell(candidates: list) -> CellRun:
    run, dups = _pick(candidates)
    return _to_cell(run, dups)


_STATE_SEARCHES = 20   # unmarked cells that ran, asked about one search each; more: one read


def fetch_histories(sweep_runs: SweepRuns, wanted: Mapping[str, Iterable[str]],
                    client=None) -> SweepRuns:
    """``sweep_runs`` with the histories of ``wanted`` (metric name -> run ids) filled in, read
    with the bulk endpoint (100 runs a request, requests in a thread pool). Histories already
    loaded for other metrics are kept."""
    client = client or reader_for(sweep_runs.tracking_uri) or mlflow_client(sweep_runs.tracking_uri)
    hist = _histories(client, {k: set(v) for k, v in wanted.items() if v})
    cells = {
        cid: dataclasses.replace(c, histories={**c.histories, **hist.get(c.run_id, {})})
        if c.run_id in hist else c
        for cid, c in sweep_runs.cells.items()
    }
    return dataclasses.replace(sweep_runs, cells=cells)


def list_sweeps(tracking_uri: str | None) -> list[dict[str, Any]]:
    """The sweeps in a tracking store (experiments with a sweep's parent run), each with its
    cell runs counted by state: ``[{"sweep", "experiment_id", "cells", "done", ...}]``, by name.
    A cell with several runs counts once, as :func:`load_sweep` picks it."""
    client = reader_for(tracking_uri) or mlflow_client(tracking_uri)
    if hasattr(client, "search_experiments") and not hasattr(client, "_tracking_client"):
        experiments = client.search_experiments()
    else:  # MLflow's client: pages of experiments
        experiments, token = [], None
        while True:
            page = client.search_experiments(max_results=1000, page_token=token)
            experiments += [e for e in page if e.lifecycle_stage == "active"]
            token = page.token
            if not token:
                break
    out = []
    for exp in experiments:
        eid = exp.experiment_id
        parents = client.search_runs([eid], f"tags.`{TAG['role']}` = 'sweep'", max_results=1)
        if not parents:
            continue
        by_cell: dict[str, list] = {}
        for run in _search_all(client, [eid], f"tags.`{TAG['role']}` = 'cell'"):
            if TAG["cell"] in run.data.tags:
                by_cell.setdefault(run.data.tags[TAG["cell"]], []).append(run)
        counts = dict.fromkeys(STATES[:4], 0)
        for cands in by_cell.values():
            status = _pick_cell(cands).status
            counts[status] = counts.get(status, 0) + 1
        out.append({"sweep": exp.name, "experiment_id": eid, "cells": len(by_cell), **counts})
    return sorted(out, key=lambda row: row["sweep"])
