"""The engine: the plan's pending cells become Ray Tune trials. The only module that imports
``ray.tune``.

Ray Tune does the running (resources, concurrency, retries, schedulers, search algorithms);
hpsweep decides what to run. Exactly once comes from the cell ids, not from Tune's experiment
state: every invocation asks MLflow which cells already have a FINISHED run and gives Tune
only the others; a cell that died resumes from the checkpoint stored under its id; its
MLflow run is reused. So a rerun after Ctrl-C, a crash, or with more seeds added runs what
is missing and nothing twice, which ``Tuner.restore`` cannot do once the spec has changed.

Across drivers (the same sweep run twice at once, overlapping sweeps), a cell runs only under
its lease in the shared storage (:mod:`hpsweep.storage`). The trial takes it, on behalf of its
driver (the record names the driver), before it touches the cell, and renews it while the cell
runs: the lease lives exactly as long as the process that writes the cell's metrics and
checkpoints, wherever Ray put it, so a driver killed with its trials lets its leases expire,
and a trial that outlives its lease (stalled past the TTL, taken over) stops before writing
again. The driver's :class:`_CellQueue` hands Tune only cells nobody holds, waits for the
others and takes over those whose lease expires.

Facts this relies on (ray 2.60): a SIGINT makes ``Tuner.fit()`` return normally, so the
interruption is detected here from the trials that neither completed nor failed; a trial
stopped by a scheduler sees ``SystemExit`` raised from ``tune.report``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid

# isort: off
# localray sets the variables Ray and Ray Tune read when they are imported: it comes first
from hpsweep import localray
# isort: on

import ray
from ray import tune
from ray.tune.search import Searcher

from hpsweep.plan import Cell, plan
from hpsweep.spec import SweepSpec
from hpsweep.storage import (
    DONE,
    FAILED,
    Lease,
    Storage,
    driver_id,
    lease_ttl,
    open_storage,
)
from hpsweep.store import TAG, SweepTracker
from hpsweep.trial import (
    CELL,
    CELL_S,
    ENDED,
    ENDED_BATCH,
    FAILURE,
    HELD_BY,
    NO_RETRY,
    PERMANENT_KEY,
    RUN_ID,
    CellFailed,
    Host,
    run_trial,
)
from hpsweep.views.live import LiveTable

__all__ = ["SweepOutcome", "run_sweep"]


@dataclasses.dataclass
class SweepOutcome:
    total: int              # cells in the plan (samples asked for, for optuna)
    skipped: int            # already finished before this invocation
    finished: int           # finished in this invocation
    failed: int
    interrupted: int        # left unfinished by a Ctrl-C
    parent_run_id: str
    experiment_id: str
    wall_s: float
    fit_s: float = 0.0      # of which in Ray Tune (the rest: Ray start-up, MLflow set-up)
    elsewhere: int = 0      # run (or being run) by other drivers while this one ran

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else (1 if self.failed else 0)


def _trial(tune_config: dict, context: dict) -> None:
    """The trainable Tune runs: the trial itself is :func:`hpsweep.trial.run_trial`."""
    run_trial(tune_config, context, Host(tune.report, tune.get_context().get_trial_id() or ""))


_BUNDLE_S = 10.0               # bundle: auto fills a trial with about this many seconds of cells
_BUNDLE_MAX = 256


# --- the driver -----------------------------------------------------------------------------

def _scheduler(spec: SweepSpec):
    if spec.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        s = spec.scheduler
        return ASHAScheduler(time_attr=s.time_attr, max_t=s.max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    return None


#: credentials Ray Tune would copy from the driver's environment into every trainable's
#: runtime environment (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``), which Ray's
#: runtime-env agent then writes to its log (and a job carries to a cluster)
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN",
                   "AWS_SESSION_TOKEN")


def _keep_credentials_out_of_runtime_envs() -> None:
    """Stop Ray Tune copying the driver's AWS keys into the trials' runtime environments.

    Ray 2.60 has no switch for it: the names are a module-level set read each time Tune
    registers a trainable, so they are taken out of that set. Workers get credentials from
    their own environment only: on one machine the process environment Ray's raylet inherits
    at start-up, on a cluster the nodes' own (instance roles, Secrets).
    tests/integration/test_hardening.py searches every file a sweep writes for a planted key.
    """
    from ray.tune.execution import class_cache

    names = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(names, set):
        names.difference_update(_CREDENTIAL_ENV)


def _cell_failure(trial) -> CellFailed | None:
    """The CellFailed a trial raised last, from the copy of the error Tune keeps."""
    from ray import cloudpickle

    path = getattr(trial, "pickled_error_file", None)
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            error = cloudpickle.load(f)
    except Exception:
        return None
    for candidate in (error, getattr(error, "cause", None)):
        if isinstance(candidate, CellFailed):
            return candidate
    return None


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _ray_log_dir() -> str:
    with contextlib.suppress(Exception):
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    return "the session's logs directory under Ray's temp dir"


class _Outcomes(tune.Callback):
    """Which trials completed or failed (the rest were interrupted), and ASHA's early stops."""

    def __init__(self, tracker: SweepTracker, asha, live: LiveTable, queue: _CellQueue | None = None,
                 retries: int = 0) -> None:
        self.tracker, self.asha, self.live = tracker, asha, live
        self.completed: set[str] = set()
        self.errored: set[str] = set()
        self.failures: list[CellFailed] = []
        self.stopped: dict[str, bool] = {}   # trial id -> stopped early (ASHA)
        self.held: dict[str, tuple[str, str]] = {}  # cell id -> (owner, lease state): run elsewhere
        # bundles (queue given): outcomes per cell, and the retries that the queue makes
        self.queue, self.retries = queue, retries
        self.cell_state: dict[str, str] = {}          # cell id -> done | failed (its last attempt)
        self.cell_failure: dict[str, CellFailed] = {}
        self.attempts: dict[str, int] = {}            # cell id -> failed attempts
        self.current: dict[str, str] = {}             # trial id -> the cell it runs now
        self.ended: dict[str, set[str]] = {}          # trial id -> its cells that ended

    def __getstate__(self) -> dict:
        # Tuner pickles its run config for Tuner.restore, which hpsweep does not use (cell
        # ids make a rerun resume instead); the MLflow client and the console stay out of it.
        return {**self.__dict__, "tracker": None, "live": None}

    @property
    def bundled(self) -> bool:
        return self.queue is not None

    def on_trial_start(self, iteration, trials, trial, **info):
        if not self.bundled:  # a bundle's rows are its cells', made as they start
            self.live.started(trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(NO_RETRY):
            # the trial is about to raise an error a retry cannot fix: Tune's retries off
            trial.max_failures = 0
            return
        if self.bundled:
            for marker in json.loads(result.get(ENDED_BATCH, "[]")):
                self._cell_result(trial.trial_id, marker)
            if CELL in result:
                self._cell_result(trial.trial_id, result)
            return
        self.live.result(trial.trial_id, result)

    # -- bundles: a row, a state and the retries per cell
    def _cell_result(self, trial_id: str, result: dict) -> None:
        cell = result[CELL]
        if HELD_BY in result:  # the queue waits for it
            self.held[cell] = (result[HELD_BY], result.get("hpsweep/lease_state", ""))
            self.live.elsewhere(None, cell, result[HELD_BY])
            return
        key = f"cell:{cell}"
        if self.current.get(trial_id) != cell:
            self.current[trial_id] = cell
            self.live.started(key, {"cell": cell})
        ended = result.get(ENDED)
        self.live.result(key, result)
        if ended is None:
            return
        self.current.pop(trial_id, None)
        self.ended.setdefault(trial_id, set()).add(cell)
        if CELL_S in result and key in self.live.rows:  # the cell's own time, not the table's
            self.live.rows[key]["start"] = time.time() - float(result[CELL_S])
        if ended == "done":
            self.cell_state[cell] = "done"
            self.cell_failure.pop(cell, None)
            self.live.done(key, "done")
            return
        failure = CellFailed(cell, result.get(FAILURE, ""), bool(result.get(PERMANENT_KEY)),
                             result.get(RUN_ID) or None)
        self._cell_failed(cell, failure, key)

    def _cell_failed(self, cell: str, failure: CellFailed, key: str) -> None:
        self.cell_state[cell] = "failed"
        self.cell_failure[cell] = failure
        self.attempts[cell] = self.attempts.get(cell, 0) + 1
        if not failure.permanent and self.attempts[cell] <= self.retries:
            self.queue.requeue([cell])  # from its last checkpoint, in a later bundle
            self.live.done(key, "retry", error=failure.headline)
        else:
            self.live.done(key, "failed", error=failure.headline)

    def _bundle_error(self, trial) -> None:
        """A bundle's worker died (or its lease was lost): the cell it ran failed this attempt;
        its cells not started go back to the queue."""
        cell = self.current.pop(trial.trial_id, None)
        ended = self.ended.pop(trial.trial_id, set())
        if cell is not None:
            message = str(getattr(trial, "error_msg", "") or "the trial's worker died").strip()
            self._cell_failed(cell, CellFailed(cell, message.splitlines()[-1][:500] if message else
                                               "the trial's worker died"), f"cell:{cell}")
        self.queue.requeue([c for c in trial.config.get("cells", ()) if c not in ended and c != cell])

    def final(self) -> tuple[int, int]:
        """(cells finished, cells failed) by this driver, each cell counted once."""
        if not self.bundled:
            return len(self.completed), len(self.errored)
        states = list(self.cell_state.values())
        return states.count("done"), states.count("failed")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.bundled:
            self.current.pop(trial.trial_id, None)
            self.ended.pop(trial.trial_id, None)
            return
        result = trial.last_result or {}
        if HELD_BY in result:  # the cell's lease was held by another driver: not run here
            cell = result["hpsweep/cell"]
            self.held[cell] = (result[HELD_BY], result.get("hpsweep/lease_state", ""))
            self.live.elsewhere(trial.trial_id, cell, result[HELD_BY])
            return
        self.completed.add(trial.trial_id)
        self.live.done(trial.trial_id, "done")
        if self.asha is not None:
            # ASHA also stops the trials that reach max_t, at their last report: only those
            # stopped before it were stopped early.
            reached = (trial.last_result or {}).get(self.asha.time_attr, 0) >= self.asha.max_t
            self.stopped[trial.trial_id] = not reached

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.bundled:
            self._bundle_error(trial)
            return
        self.errored.add(trial.trial_id)
        failure = _cell_failure(trial)
        if failure is not None:
            self.failures.append(failure)
        self.live.done(trial.trial_id, "failed",
                       error=failure.headline if failure else str(getattr(trial, "error_msg", "") or ""))

    def report_failures(self, note, cells: dict[str, Cell]) -> None:
        """Each distinct error once: the trainer's exception, its frames, the cells it hit."""
        groups: dict[str, list[CellFailed]] = {}
        failures = self.failures if not self.bundled else [
            self.cell_failure[c] for c, s in self.cell_state.items() if s == "failed" and c in self.cell_failure]
        for failure in failures:
            groups.setdefault(failure.summary, []).append(failure)
        for summary, failures in groups.items():
            first = failures[0]
            cell = cells.get(first.cell)
            label = f"cell {first.cell}" + (f" ({_params_text(cell.params)})" if cell else "")
            more = f", and {len(failures) - 1} more cells with the same error" if len(failures) > 1 else ""
            where = f"MLflow run {first.run_id}, artifact error.txt" if first.run_id else "Ray's worker logs"
            retry = "" if first.permanent else " (retried first)"
            note(f"\n{label} failed{retry}{more}:\n{summary}\nfull traceback: {where}; Ray's logs: "
                 f"{_ray_log_dir()}")

    def finish_stopped(self, rounds: int = 3) -> set[str]:
        """Close the runs of trials the scheduler stopped: they end KILLED or RUNNING (stopped
        inside a report); found by the trial id every attempt tags its run with. A few rounds,
        for workers still closing their runs when the sweep ends. Returns their cells."""
        closed: set[str] = set()
        for i in range(rounds):
            for cell, rs in self.tracker.cell_runs().items():
                for run in rs:
                    trial = run.data.tags.get(TAG["trial"])
                    if trial in self.stopped and run.info.status in ("RUNNING", "KILLED"):
                        self.tracker.client.set_tag(run.info.run_id, TAG["early"],
                                                    "true" if self.stopped[trial] else "false")
                        self.tracker.client.set_terminated(run.info.run_id, status="FINISHED")
                        closed.add(cell)
            if i < rounds - 1:
                time.sleep(1.0)
        return closed


def run_sweep(spec: SweepSpec, spec_text: str, *, tracking_uri: str, storage_uri: str | None = None,
              address: str | None = None, s3_endpoint: str | None = None, live: bool | None = None,
              console=None, ray_start: localray.Start | None = None) -> SweepOutcome:
    """Run every cell of ``spec`` that has no finished run yet; see the module docstring.

    The sweep's parent run never stays RUNNING when this raises: a Ctrl-C during Ray's
    start-up (or any error before Tune takes over) ends it KILLED (FAILED for an error).
    """
    tracker = SweepTracker(tracking_uri, spec.name)
    try:
        return _run_sweep(spec, spec_text, tracker, tracking_uri=tracking_uri, storage_uri=storage_uri,
                          address=address, s3_endpoint=s3_endpoint, live=live, console=console,
                          ray_start=ray_start)
    except BaseException as exc:
        if tracker.parent_run_id is not None:
            with contextlib.suppress(Exception):  # never mask the interruption or the error
                if tracker.client.get_run(tracker.parent_run_id).info.status == "RUNNING":
                    tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def _run_sweep(spec: SweepSpec, spec_text: str, tracker: SweepTracker, *, tracking_uri: str,
               storage_uri: str | None, address: str | None, s3_endpoint: str | None,
               live: bool | None, console, ray_start: localray.Start | None) -> SweepOutcome:
    started = time.time()
    storage = open_storage(storage_uri, s3_endpoint)
    with storage.lock(f"sweep-{spec.name}"):  # drivers started together: one parent run
        parent = tracker.start(spec.spec_hash(), spec_text, spec.description, storage_uri=storage.uri)
    existing = tracker.cell_runs()
    finished = tracker.finished_cells(existing)
    if tracker.index:  # finished runs the index lacks (a crash between the two, an older sweep)
        _mark_finished(storage, tracker.index, finished - storage.finished_marks(tracker.index))

    optuna = spec.search.algorithm == "optuna"
    cells = plan(spec)
    if optuna:
        total = spec.search.samples
        todo = max(0, total - len(finished))
        pending: list[Cell] = []
        skipped = len(finished)
    else:
        total = len(cells)
        pending = [c for c in cells if c.id not in finished]
        todo = len(pending)
        skipped = total - todo
    table = LiveTable(spec, pending, console=console, enabled=live, total=total, skipped=skipped)
    if todo == 0:
        tracker.finish("FINISHED")
        table.note(f"all {total} cells of {spec.name!r} already have a finished run; nothing to run")
        return SweepOutcome(total, skipped, 0, 0, 0, parent, tracker.experiment_id, time.time() - started)

    if ray_start is not None:  # begun before this driver read the sweep's state
        ray_start.wait()
    else:
        localray.init(address, localray.ray_env())
    _keep_credentials_out_of_runtime_envs()
    # Tune's end-of-run analysis looks for the per-result JSON/CSV files that hpsweep turns
    # off (the metrics are in MLflow); its warning about them is noise.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

    context = {
        "trainer": spec.trainer, "sweep": spec.name, "tracking_uri": tracking_uri,
        "experiment_id": tracker.experiment_id, "parent_run_id": parent,
        "storage": storage.spec(), "every": spec.checkpoint.every, "cpus": spec.resources.cpus,
        "metric": spec.metric.name, "optuna": optuna, "bases": spec.data_bases(),
        "driver": driver_id(), "lease_ttl": lease_ttl(), "index": tracker.index,
        "cells": {c.id: c for c in pending},
        "ran": frozenset(existing),   # cells with a run in MLflow (none finished) at the start
    }
    search_alg, queue = None, None
    if optuna:
        from ray.tune.search.optuna import OptunaSearch

        domains = dict(spec.parameters)
        param_space = {k: d.to_tune(tune) for k, d in domains.items()}
        context.update({"swept": list(domains), "seed": spec.seed_list[0], "spec": spec})
        search_alg = OptunaSearch(metric=spec.metric.name, mode=spec.metric.mode)
    else:
        param_space = {}
        queue = search_alg = _CellQueue(_spread(pending), storage, tracker, table, context,
                                        bundle=spec.bundle if spec.bundles() else 1, slots=_slots(spec))
    outcomes = _Outcomes(tracker, spec.scheduler if spec.scheduler.type == "asha" else None, table,
                         queue=queue if spec.bundles() else None, retries=spec.retries)
    fit_started = time.time()
    with table, _pending_trials(None if optuna else _slots(spec)):
        _tuner(spec, context, param_space, search_alg, outcomes, storage, todo if optuna else -1).fit()
    fit_s = time.time() - fit_started
    outcomes.report_failures(table.note, context["cells"])
    elsewhere = len(outcomes.held) if optuna else queue.elsewhere
    if outcomes.stopped:
        closed = outcomes.finish_stopped()
        if tracker.index:
            _mark_finished(storage, tracker.index, closed)
    completed, failed = outcomes.final()
    interrupted = todo - completed - failed - elsewhere
    if interrupted > 0:
        # Trials killed by the interruption leave RUNNING runs: mark them KILLED; a rerun
        # resumes those cells (same runs, from their checkpoints). Cells that other drivers
        # hold are theirs to settle.
        unfinished = [c for c, rs in tracker.cell_runs().items()
                      if not any(r.info.status == "FINISHED" for r in rs)]
        others = {c for c, lease in storage.live_leases(unfinished).items() if lease.owner != driver_id()}
        tracker.settle([c for c in unfinished if c not in others], "KILLED")
        tracker.finish("KILLED")
    else:
        # Only this driver's own failures fail the sweep's parent run.
        tracker.finish("FAILED" if failed else "FINISHED")
    return SweepOutcome(total, skipped, completed, failed, max(0, interrupted), parent,
                        tracker.experiment_id, time.time() - started, fit_s, elsewhere)


def _tuner(spec: SweepSpec, context: dict, param_space: dict, search_alg, outcomes: _Outcomes,
           storage: Storage, num_samples: int) -> tune.Tuner:
    resources = {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus}
    trainable = tune.with_resources(tune.with_parameters(_trial, context=context), resources)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=spec.metric.name, mode=spec.metric.mode, num_samples=num_samples,
            search_alg=search_alg, scheduler=_scheduler(spec),
            max_concurrent_trials=spec.max_concurrent or None, reuse_actors=True,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            # unique per driver and round: drivers of one sweep share the storage
            name=time.strftime("tune-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6],
            storage_path=storage.path(spec.name), storage_filesystem=storage.fs,
            # bundles: the queue retries each failed cell, never a whole bundle
            failure_config=tune.FailureConfig(max_failures=0 if spec.bundles() else spec.retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[outcomes], verbose=0, progress_reporter=_Silent(),
        ),
    )


def _trial_name(trial) -> str:
    cells = trial.config.get("cells")
    if cells:
        return f"cells_{cells[0]}" + (f"_and_{len(cells) - 1}" if len(cells) > 1 else "")
    return f"cell_{trial.config.get('cell', trial.trial_id)}"


def _slots(spec: SweepSpec) -> int:
    """How many trials of ``spec`` the Ray cluster can run at once now (at least one)."""
    res = ray.cluster_resources()
    slots = res.get("CPU", 1.0) / spec.resources.cpus if spec.resources.cpus else float("inf")
    if spec.resources.gpus:
        slots = min(slots, res.get("GPU", 0.0) / spec.resources.gpus)
    if spec.max_concurrent:
        slots = min(slots, spec.max_concurrent)
    return max(1, int(slots)) if slots != float("inf") else 200


@contextlib.contextmanager
def _pending_trials(n: int | None):
    """Let Tune keep ``n`` trials pending (created, waiting for resources) while it runs.

    Tune allows a custom searcher such as :class:`_CellQueue` one pending trial at a time
    (``TUNE_MAX_PENDING_TRIALS_PG`` "auto"), so trials would start one by one, each after the
    previous one got its resources; grid_search got 200. ``n`` = the trials the cluster can run
    at once fills every slot at the start, while each cell is still handed out shortly before
    its trial starts (the searcher's look at its lease stays fresh). A value the user set wins.
    """
    name = "TUNE_MAX_PENDING_TRIALS_PG"
    if n is None or name in os.environ:
        yield
        return
    os.environ[name] = str(n)
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _spread(cells: list[Cell]) -> list[Cell]:
    """The cells in plan order, seeds outermost (every configuration gets its first seed before
    any gets a second), but within each seed starting at a place of this driver's own: drivers
    started together then begin on different cells instead of all contending for the first."""
    if len(cells) < 2:
        return cells
    k = int(hashlib.sha256(driver_id().encode()).hexdigest(), 16)
    by_seed: dict[int, list[Cell]] = {}
    for c in cells:
        by_seed.setdefault(c.seed, []).append(c)
    out: list[Cell] = []
    for group in by_seed.values():
        j = k % len(group)
        out += group[j:] + group[:j]
    return out


_SETTLE_SEARCHES = 20   # waited-for cells asked about one search each; more: one read of the sweep


class _CellQueue(Searcher):
    """The grid's cells to Tune one at a time, as it has room for a trial (a Tune searcher).

    A cell whose lease another driver holds, live or done, is passed over and waited for
    (polling its lease and MLflow); one whose lease expires unfinished (its driver died) or is
    released is handed out again, and its trial takes it over from its checkpoint. A lease
    record says how a waited-for cell ended: ``done`` in this sweep (its run is in MLflow),
    ``done`` in another sweep sharing the cell (its run is copied into this one), ``failed``
    (that driver's failure, not this one's). The search ends when every cell has been run
    here or settled elsewhere. Trials still take each lease atomically (``hpsweep.trial``): the
    look here only spares a trial for cells already taken."""

    def __init__(self, cells: list[Cell], storage: Storage, tracker: SweepTracker, table: LiveTable,
                 context: dict, bundle: int | str = 1, slots: int = 1) -> None:
        super().__init__()
        self.bundle, self.slots = bundle, max(1, slots)   # bundle: 1 (a cell a trial), N, "auto"
        self.cell_seconds, self.cells_timed = 0.0, 0
        self.storage, self.tracker, self.table = storage, tracker, table
        self.experiment_id, self.cells = context["experiment_id"], context["cells"]
        self.queue = collections.deque(c.id for c in cells)
        self.waiting: dict[str, str] = {}     # cell id -> its holder
        self.force: set[str] = set()          # done records this sweep's MLflow lacks
        self.active = 0                       # trials handed out and not ended
        self.elsewhere = 0                    # cells settled by other drivers
        self.poll = min(2.0, max(0.2, context["lease_ttl"] / 6))
        self._next_poll = 0.0

    def __getstate__(self) -> dict:  # Tune may pickle its searcher; clients stay out
        return {**self.__dict__, "storage": None, "tracker": None, "table": None}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: a rerun rebuilds the queue from MLflow and the leases."""

    def restore(self, checkpoint_path: str) -> None:
        pass

    def bundle_size(self) -> int:
        """Cells for the next trial. ``auto``: as many as fill about ``_BUNDLE_S`` seconds at
        the mean duration of the cells ended so far (one until a cell has ended: long cells
        keep a trial each); never more than half an even share of the queue over the slots, so
        that bundles shrink towards the end and every slot works until about the same time."""
        if self.bundle == 1:
            return 1
        if self.bundle == "auto":
            if not self.cells_timed:
                return 1
            mean = self.cell_seconds / self.cells_timed
            n = int(_BUNDLE_S / max(mean, 1e-3))
        else:
            n = int(self.bundle)
        share = -(-len(self.queue) // (2 * self.slots))
        return max(1, min(n, share, _BUNDLE_MAX))

    def requeue(self, cells: list[str]) -> None:
        """Cells of a bundle to hand out again (a retry, or a bundle cut short)."""
        self.queue.extendleft(reversed(cells))

    def suggest(self, trial_id: str):
        size, picked = self.bundle_size(), []
        while self.queue and len(picked) < size:
            cid = self.queue.popleft()
            lease = None if cid in self.force else self.storage.read_lease(cid)
            if lease is not None and (lease.live or lease.state == DONE):
                self.waiting[cid] = lease.owner
                self.table.elsewhere(None, cid, lease.owner)
                continue
            picked.append(cid)
        if picked:
            self.active += 1
            forced = [c for c in picked if c in self.force]
            if self.bundle == 1:
                return {"cell": picked[0], **({"force": True} if forced else {})}
            return {"cells": picked, **({"force": forced} if forced else {})}
        if self.waiting and time.time() >= self._next_poll:
            self._next_poll = time.time() + self.poll
            self._settle()
            if self.queue:
                return self.suggest(trial_id)
        if not self.waiting and self.active <= 0:
            return Searcher.FINISHED
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if HELD_BY in result:  # its trial lost the race for the lease: wait for the cell
            self.waiting[result[CELL]] = result[HELD_BY]
        for marker in json.loads(result.get(ENDED_BATCH, "[]")):
            self.cell_seconds += float(marker[CELL_S])
            self.cells_timed += 1

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.active -= 1
        if result and HELD_BY in result:  # its trial lost the race for the lease
            self.waiting[result[CELL]] = result[HELD_BY]

    def _settle(self) -> None:
        leases = {cid: self.storage.read_lease(cid) for cid in self.waiting}
        # a failed lease settles its cell without MLflow; a live one is still at work
        ended_here = [cid for cid, lease in leases.items()
                      if lease is None or not (lease.live or lease.state == FAILED)]
        finished = self._finished(ended_here)
        taken = []
        for cid, lease in leases.items():
            if cid in finished or (lease is not None and lease.state == FAILED):
                ended = "done" if cid in finished else "failed"
            elif lease is not None and lease.live:
                continue
            elif lease is not None and lease.state == DONE:
                if _adopt(self.tracker, self.storage, self.cells[cid], lease):
                    ended = "done"
                elif lease.info.get("experiment_id") == self.experiment_id \
                        and lease.info.get("tracking_uri") == self.tracker.tracking_uri \
                        and lease.expires > time.time() - 30:
                    continue  # just finished in this sweep: MLflow's search shows it next time
                else:
                    self.force.add(cid)  # done where this sweep's MLflow cannot see: run it
                    taken.append(cid)
                    continue
            else:  # expired, released, stopped: its runner is gone
                taken.append(cid)
                continue
            self.waiting.pop(cid)
            self.elsewhere += 1
            self.table.settled(cid, ended)
        for cid in taken:
            self.waiting.pop(cid)
            self.table.settled(cid, "released")
            self.queue.appendleft(cid)
        if taken:
            self.table.note(f"taking over {len(taken)} cells whose leases expired or were released")

    def _finished(self, cells: list[str]) -> set[str]:
        """Which of ``cells`` (waited-for cells whose leases are no longer live) have a FINISHED
        run in this sweep: a search per cell when they are few, one read of the sweep when many.
        A cell whose lease is still live is not asked about: its holder is still at work."""
        if len(cells) > _SETTLE_SEARCHES:
            return self.tracker.finished_cells() & set(cells)
        return {cid for cid in cells if self.tracker.cell_finished(cid)}


def _adopt(tracker: SweepTracker, storage: Storage, cell: Cell, lease: Lease) -> bool:
    """A cell done by another sweep that shares it (same content id), tracked in the same
    MLflow: its run is copied into this sweep (once: under a lock), not trained again."""
    info = lease.info
    if info.get("experiment_id") in (None, tracker.experiment_id) or \
            info.get("tracking_uri") != tracker.tracking_uri or not info.get("run_id"):
        return False
    with storage.lock(f"adopt-{tracker.experiment_id}-{cell.id}"):
        adopted = tracker.cell_finished(cell.id) or tracker.adopt(cell, info["run_id"], info.get("sweep", ""))
    if adopted and tracker.index:
        _mark_finished(storage, tracker.index, {cell.id})
    return adopted


def _mark_finished(storage: Storage, index: str, cells: set[str]) -> None:
    """Add ``cells`` (each with a FINISHED run now) to the sweep's finished index; S3 writes in
    a thread pool. A mark that fails to be written costs ``status`` a search, nothing more."""
    from concurrent.futures import ThreadPoolExecutor

    def mark(cid: str) -> None:
        with contextlib.suppress(Exception):
            storage.mark_finished(index, cid)

    if len(cells) < 8 or not storage.is_s3:
        for cid in cells:
            mark(cid)
        return
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(mark, cells))


class _Silent(tune.ProgressReporter):
    """Tune's own table is replaced by :class:`hpsweep.views.live.LiveTable`."""

    def should_report(self, trials, done=False):
        return False

    def report(self, trials, done, *sys_info):
        pass
