"""The engine: the plan's pending cells become Ray Tune trials. The only module that imports
``ray.tune``.

Ray Tune does the running (resources, concurrency, retries, schedulers, search algorithms);
hpsweep decides what to run. Exactly once comes from the cell ids, not from Tune's experiment
state: every invocation asks MLflow which cells already have a FINISHED run and gives Tune
only the others; a cell that died resumes from the checkpoint stored under its id; its
MLflow run is reused. So a rerun after Ctrl-C, a crash, or with more seeds added runs what
is missing and nothing twice, which ``Tuner.restore`` cannot do once the spec has changed.

Across drivers (the same sweep run twice at once, overlapping sweeps), a cell runs only under
its lease in the shared storage (:mod:`hpsweep.store.storage`). The trial takes it, on behalf of its
driver (the record names the driver), before it touches the cell, and renews it while the cell
runs: the lease lives exactly as long as the process that writes the cell's metrics and
checkpoints, wherever Ray put it, so a driver killed with its trials lets its leases expire,
and a trial that outlives its lease (stalled past the TTL, taken over) stops before writing
again. The driver's cell queue (:mod:`hpsweep.run.queue`) hands Tune only cells nobody holds, waits for the
others and takes over those whose lease expires.

Facts this relies on (ray 2.60): a SIGINT makes ``Tuner.fit()`` return normally, so the
interruption is detected here from the trials that neither completed nor failed; a trial
stopped by a scheduler sees ``SystemExit`` raised from ``tune.report``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import uuid

# isort: off
# localray sets the variables Ray and Ray Tune read when they are imported: it comes first
from hpsweep.run import localray
# isort: on

import ray
from ray import tune
from ray.tune.search import Searcher

from hpsweep.run.outcomes import Outcomes
from hpsweep.run.queue import FINISHED, CellQueue, mark_finished, spread
from hpsweep.run.resources import DEFAULT_NODE_WAIT_S, NodeWait, request
from hpsweep.run.trial import (
    Host,
    run_trial,
)
from hpsweep.spec.model import SweepSpec
from hpsweep.spec.plan import Cell, plan
from hpsweep.store.leases import driver_id, lease_ttl
from hpsweep.store.mlflow import SweepTracker, code_version
from hpsweep.store.storage import Storage, open_storage
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
    elsewhere: int = 0      # settled by other drivers while this one ran (done or failed there)
    elsewhere_failed: int = 0   # of which failed there
    copied: int = 0         # of which copied in from another sweep that finished them
    taken_over: dict[str, int] = dataclasses.field(default_factory=dict)  # new holder -> cells it
    #                         took over from this driver (and settled), counted in ``elsewhere``
    lost_failed: int = 0    # of those, cells that failed there
    waited: str = ""        # stopped after waiting --node-wait for a node: what it waited for

    @property
    def exit_code(self) -> int:
        if self.waited:
            return 3
        return 130 if self.interrupted else (1 if self.failed or self.lost_failed else 0)

    def summary(self) -> list[str]:
        """The lines that say what became of every cell, each counted once."""
        done_there = self.elsewhere - self.elsewhere_failed
        lines = [f"{self.finished} cells finished, {self.failed} failed, {self.skipped} already done, "
                 f"{done_there} finished elsewhere"
                 + (f" ({self.copied} copied from other sweeps)" if self.copied else "")
                 + (f", {self.elsewhere_failed} failed elsewhere" if self.elsewhere_failed else "")
                 + f", {self.interrupted} interrupted in {self.wall_s:.1f}s ({self.fit_s:.1f}s running trials)"]
        for owner, n in sorted(self.taken_over.items()):
            lines.append(f"{n} cells taken over by {owner} (this driver stalled past their leases; "
                         "counted above where they ended)")
        return lines


def _trial(tune_config: dict, context: dict) -> None:
    """The trainable Tune runs: the trial itself is :func:`hpsweep.run.trial.run_trial`."""
    run_trial(tune_config, context, Host(tune.report, tune.get_context().get_trial_id() or ""))




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


class _Callback(tune.Callback):
    """Tune's trial events, handed to :class:`hpsweep.run.outcomes.Outcomes`."""

    def __init__(self, outcomes: Outcomes, wait: NodeWait | None = None) -> None:
        self.outcomes, self.wait = outcomes, wait

    def on_step_begin(self, iteration, trials, **info):
        if self.wait is not None:
            self.wait.poll()

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.wait is not None:
            self.wait.started()
        self.outcomes.started(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.outcomes.result(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.outcomes.complete(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.outcomes.error(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.outcomes.recover(trial)


def run_sweep(spec: SweepSpec, spec_text: str, *, tracking_uri: str, storage_uri: str | None = None,
              address: str | None = None, s3_endpoint: str | None = None, live: bool | None = None,
              console=None, ray_start: localray.Start | None = None,
              node_wait: float | None = None) -> SweepOutcome:
    """Run every cell of ``spec`` that has no finished run yet; see the module docstring.

    The sweep's parent run never stays RUNNING when this raises: a Ctrl-C during Ray's
    start-up (or any error before Tune takes over) ends it KILLED (FAILED for an error).
    """
    tracker = SweepTracker(tracking_uri, spec.name)
    try:
        return _run_sweep(spec, spec_text, tracker, tracking_uri=tracking_uri, storage_uri=storage_uri,
                          address=address, s3_endpoint=s3_endpoint, live=live, console=console,
                          ray_start=ray_start, node_wait=node_wait)
    except BaseException as exc:
        if tracker.parent_run_id is not None:
            with contextlib.suppress(Exception):  # never mask the interruption or the error
                if tracker.client.get_run(tracker.parent_run_id).info.status == "RUNNING":
                    tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def _run_sweep(spec: SweepSpec, spec_text: str, tracker: SweepTracker, *, tracking_uri: str,
               storage_uri: str | None, address: str | None, s3_endpoint: str | None,
               live: bool | None, console, ray_start: localray.Start | None,
               node_wait: float | None = None) -> SweepOutcome:
    started = time.time()
    storage = open_storage(storage_uri, s3_endpoint)
    trainer = spec.trainer_info()
    code = code_version(trainer.source_dir(), trainer.module)
    with storage.lock(f"sweep-{spec.name}"):  # drivers started together: one parent run
        parent = tracker.start(spec.spec_hash(), spec_text, spec.description, storage_uri=storage.uri,
                               overrides=spec._sources.overridden() if spec._sources else (),
                               code=code)
        tracker.set_view(spec.swept_names(), spec.metric.name, spec.metric.mode)
    existing = tracker.cell_runs()
    finished = tracker.finished_cells(existing)
    if tracker.index:  # finished runs the index lacks (a crash between the two, an older sweep)
        mark_finished(storage, tracker.index, finished - storage.finished_marks(tracker.index))

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
    localray.own_signals()  # SIGTERM: as Ctrl-C, not Ray's stack dump
    _keep_credentials_out_of_runtime_envs()
    # Tune's end-of-run analysis looks for the per-result JSON/CSV files that hpsweep turns
    # off (the metrics are in MLflow); its warning about them is noise.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

    context = {
        "trainer": spec.trainer, "trainer_base": _where(spec.trainer_base()), "code_version": code,
        "sweep": spec.name, "tracking_uri": tracking_uri,
        "experiment_id": tracker.experiment_id, "parent_run_id": parent,
        "storage": storage.spec(), "every": spec.checkpoint.every, "cpus": spec.resources.cpus,
        "metric": spec.metric.name, "optuna": optuna, "bases": _bases(spec.data_bases()),
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
        queue = CellQueue(spread(pending), storage, tracker, table, context,
                          bundle=spec.bundle if spec.bundles() else 1, slots=_slots(spec))
        search_alg = _TuneQueue(queue)
    outcomes = Outcomes(tracker, spec.scheduler if spec.scheduler.type == "asha" else None, table,
                         queue=queue if spec.bundles() else None, retries=spec.retries, storage=storage)
    wait = None
    if address:  # a cluster: a node that can hold a trial may be yet to come
        tagged: list[str | None] = [None]

        def show(message: str | None, since: float) -> None:
            table.waiting(message, since)
            if message != tagged[0]:  # the sweep's run says it once per change (status reads it)
                tagged[0] = message
                with contextlib.suppress(Exception):  # never stops the sweep
                    tracker.set_waiting(message, since)

        wait = NodeWait(request(spec.resources), DEFAULT_NODE_WAIT_S if node_wait is None else node_wait, show)
    fit_started = time.time()
    with table, _pending_trials(None if optuna else _slots(spec)):
        _tuner(spec, context, param_space, search_alg, outcomes, storage, todo if optuna else -1,
               wait).fit()
    fit_s = time.time() - fit_started
    if wait is not None and wait.message is not None:
        with contextlib.suppress(Exception):
            tracker.set_waiting(None, wait.since)
    if wait is not None and wait.expired:
        # nothing started: the cells stay pending (no run, no lease), the sweep's run KILLED
        tracker.finish("KILLED")
        return SweepOutcome(total, skipped, 0, 0, 0, parent, tracker.experiment_id,
                            time.time() - started, fit_s, waited=wait.message or "a node")
    outcomes.report_failures(table.note, context["cells"])
    elsewhere = len(outcomes.held) if optuna else queue.elsewhere
    if outcomes.stopped:
        closed = outcomes.finish_stopped()
        if tracker.index:
            mark_finished(storage, tracker.index, closed)
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
    settled = queue.settled_by if queue is not None else {}
    taken_over: dict[str, int] = {}
    for cid, owner in outcomes.lost.items():
        if cid in settled:
            taken_over[owner] = taken_over.get(owner, 0) + 1
    return SweepOutcome(total, skipped, completed, failed, max(0, interrupted), parent,
                        tracker.experiment_id, time.time() - started, fit_s, elsewhere,
                        elsewhere_failed=sum(e == "failed" for e, _ in settled.values()),
                        copied=queue.copied if queue is not None else 0, taken_over=taken_over,
                        lost_failed=sum(settled.get(c, ("",))[0] == "failed" for c in outcomes.lost))


def _where(directory: str) -> tuple[str, str | None]:
    """The sweep file's directory as a trial finds it: absolute, and relative to the driver's
    working directory when inside it (a job's working directory lands elsewhere on each node)."""
    from pathlib import Path

    path = Path(directory)
    try:
        return str(path), path.relative_to(Path.cwd().absolute()).as_posix()
    except ValueError:
        return str(path), None


def _bases(bases: list[str]) -> list[str]:
    """Where a trial resolves relative data locations. In a submitted job each node has a copy
    of the job's working directory of its own, its trials' working directory: a base inside it
    is given relative to it, so that a trial reads its own node's copy."""
    from hpsweep.trainer.data import SHIPPED_FROM

    if not os.environ.get(SHIPPED_FROM):
        return bases
    return [relative if relative is not None else absolute
            for absolute, relative in map(_where, bases)]


def _tuner(spec: SweepSpec, context: dict, param_space: dict, search_alg, outcomes: Outcomes,
           storage: Storage, num_samples: int, wait: NodeWait | None = None) -> tune.Tuner:
    resources = spec.resources.ray()
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
            callbacks=[_Callback(outcomes, wait)], verbose=0, progress_reporter=_Silent(),
            stop=_WaitStopper(wait) if wait is not None else None,
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
    slots = float("inf")
    for name, amount in request(spec.resources).items():
        slots = min(slots, res.get(name, 0.0) / amount)
    if spec.max_concurrent:
        slots = min(slots, spec.max_concurrent)
    return max(1, int(slots)) if slots != float("inf") else 200


@contextlib.contextmanager
def _pending_trials(n: int | None):
    """Let Tune keep ``n`` trials pending (created, waiting for resources) while it runs.

    Tune allows a custom searcher such as the cell queue one pending trial at a time
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


class _TuneQueue(Searcher):
    """:class:`hpsweep.run.queue.CellQueue` as a Tune searcher: Tune asks it for the next trial's
    config; the queue, which knows nothing of Tune, decides."""

    def __init__(self, queue: CellQueue) -> None:
        super().__init__()
        self.queue = queue

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: a rerun rebuilds the queue from MLflow and the leases."""

    def restore(self, checkpoint_path: str) -> None:
        pass

    def suggest(self, trial_id: str):
        config = self.queue.suggest()
        return Searcher.FINISHED if config is FINISHED else config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.queue.on_result(result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.queue.on_complete(result)


class _WaitStopper(tune.Stopper):
    """Ends the sweep when :class:`hpsweep.run.resources.NodeWait` gave up waiting for a node."""

    def __init__(self, wait: NodeWait) -> None:
        self.wait = wait

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.wait.expired


class _Silent(tune.ProgressReporter):
    """Tune's own table is replaced by :class:`hpsweep.views.live.LiveTable`."""

    def should_report(self, trials, done=False):
        return False

    def report(self, trials, done, *sys_info):
        pass
