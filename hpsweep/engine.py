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
import logging
import os
import time
import uuid

# Set before ray.tune is imported: no per-result JSON/CSV/TensorBoard files (MLflow has the
# metrics), and trials run in the caller's working directory so relative data paths work.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1e9")
# Trainers report different metrics at different times (training loss every few steps,
# validation now and then); Tune's check that every result carries the sweep metric would
# fail them. _TuneRun carries the latest value of the sweep metric forward instead.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
# A failed trial's error is shown once per distinct error, in the trainer's own terms
# (_Outcomes.report_failures), not as Tune's log of every attempt's full Ray traceback.
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
# In-process Ray on loopback only. ray.init turns `_node_ip_address="127.0.0.1"` into the
# machine's external address (ray._private.services.resolve_ip_for_localhost) unless Ray runs
# without multi-node support, which this variable (read when ray is imported) switches off;
# then the GCS, raylet, object manager, workers, driver and agents all bind 127.0.0.1 (see
# README, "What listens where"). A driver joining a cluster (`--address`) takes the node's
# address from the cluster instead, so this changes nothing there.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from hpsweep import reaper  # noqa: E402
from hpsweep.plan import Cell, cell_id, plan, resolve_config  # noqa: E402
from hpsweep.spec import SweepSpec  # noqa: E402
from hpsweep.storage import (  # noqa: E402
    DONE,
    FAILED,
    STOPPED,
    HeldLease,
    Lease,
    LeaseLost,
    Storage,
    driver_id,
    lease_ttl,
    open_storage,
)
from hpsweep.store import TAG, CellTracker, SweepTracker, code_version  # noqa: E402
from hpsweep.views.live import LiveTable  # noqa: E402

__all__ = ["SweepOutcome", "run_sweep", "cluster_nodes"]

_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                  "MLFLOW_DISABLE_TELEMETRY", "HPSWEEP_DATA_CACHE", "HPSWEEP_SHARED_DATA")


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


# --- the trial (runs on a Ray worker) -------------------------------------------------------

class _TuneRun:
    """The trainer's ``run`` inside a trial: MLflow through the cell's tracker, checkpoints in
    the sweep's storage under the cell id, outputs in the storage's ``outputs/`` (logged as
    artifacts too), progress to Tune."""

    def __init__(self, cell: Cell, storage: Storage, sweep: str, tracker: CellTracker,
                 every: int, device, metric: str, bases: list[str] | None = None) -> None:
        self.cell, self.storage, self.sweep, self.tracker = cell, storage, sweep, tracker
        self.bases = bases or []   # where relative data paths resolve: the sweep's dir, the data root
        self.every = every
        self.device = device
        self.metric = metric
        self._latest: dict[str, float] = {}
        self._saves = 0
        self._held: bytes | None = None
        self.lease: HeldLease | None = None   # the cell's lease (see _hold_cell)

    def report(self, step: int, **metrics: float) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        if self.lease is not None:
            self.lease.check()  # taken over by another driver: write nothing more
        self.tracker.check()
        # The checkpoint saved before this report goes out with it (see CellTracker).
        self.tracker.log(step, values, checkpoint=self._held)
        self._held = None
        if self.metric in values:
            self._latest[self.metric] = values[self.metric]
        # Tune (schedulers, searchers, the live table) sees the sweep metric in every result
        # once it is known; MLflow gets only what the trainer reported.
        tune.report({**self._latest, **values, "step": int(step)})

    def save_checkpoint(self, state: dict) -> None:
        from trainers.common.run import dump_state

        self._saves += 1
        if self._saves % self.every == 0:
            self._held = dump_state(state)  # serialised now: the trainer goes on mutating state

    def load_checkpoint(self) -> dict | None:
        from trainers.common.run import load_state

        data = self.storage.read_bytes(self.sweep, "cells", self.cell.id, "checkpoint.pt")
        return None if data is None else load_state(data, self.device)

    def log_artifact(self, path: str) -> None:
        self.tracker.log_artifact(path)

    def data_path(self, uri: str):
        from pathlib import Path

        from trainers.common.data import default_cache_dir, fetch, locate, output_name

        name = output_name(uri)
        if name is None:
            return fetch(locate(uri, [Path(b) for b in self.bases]))
        path = self.storage.get_path(default_cache_dir() / "outputs", "outputs", *name.split("/"))
        if path is None:
            raise FileNotFoundError(f"{uri!r}: no output {name!r} in {self.storage.uri}/outputs "
                                    "(run the sweep that writes it first, on the same --storage)")
        return path

    def output(self, name: str):
        from trainers.common.run import staged_output

        def store(path) -> None:
            self.storage.put_path(path, "outputs", *name.strip("/").split("/"))
            if path.is_dir():
                self.tracker.client.log_artifacts(self.tracker.run_id, str(path), artifact_path=path.name)
            else:
                self.tracker.log_artifact(str(path))

        return staged_output(name, store)


#: errors a retry cannot fix (a missing file, a bad value, a bug): the trial fails at once
_PERMANENT = (LookupError, ValueError, TypeError, AttributeError, ImportError, NotImplementedError,
              FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
              ArithmeticError, AssertionError)
#: the result key by which a trial tells the driver not to retry it (see _Outcomes)
_NO_RETRY = "hpsweep/no_retry"


class CellFailed(Exception):
    """A trainer's exception as the driver shows it: the cell, the exception's type and message,
    and the trainer's own frames; the full traceback is in the cell's MLflow run (error.txt)."""

    # every argument has a default: Ray rebuilds exceptions on the driver in ways that call
    # the constructor with fewer of them (the fields come back from the pickled __dict__)
    def __init__(self, cell: str = "", summary: str = "", permanent: bool = False,
                 run_id: str | None = None) -> None:
        super().__init__(cell, summary, permanent, run_id)
        self.cell, self.summary, self.permanent, self.run_id = cell, summary, permanent, run_id

    def __str__(self) -> str:
        return f"cell {self.cell}: {self.summary}"

    @property
    def headline(self) -> str:
        return self.summary.splitlines()[0]


def _summary(exc: BaseException) -> str:
    """``Type: message`` and the frames of the traceback inside ``trainers/`` (the trainer's own
    code; not hpsweep's, Ray's or a library's)."""
    import traceback
    from pathlib import Path

    import trainers

    root = Path(trainers.__file__).resolve().parent
    head = f"{type(exc).__name__}: {exc}".strip()
    lines = [head.splitlines()[0][:500] if head else type(exc).__name__]
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(root):
            lines.append(f"  {path.relative_to(root.parent)}:{frame.lineno} in {frame.name}: "
                         f"{(frame.line or '').strip()}")
    return "\n".join(lines[:1] + lines[1:][-6:])


def _fail(exc: Exception, cell: Cell, tracker: CellTracker | None, run: _TuneRun | None,
          context: dict) -> CellFailed:
    """Record the trainer's exception in the cell's run (tag and full traceback) and tell Tune
    not to retry a permanent one; returns what the trial raises instead."""
    import traceback

    summary = _summary(exc)
    permanent = isinstance(exc, _PERMANENT)
    run_id = None
    if tracker is not None:
        with contextlib.suppress(Exception):  # never mask the trainer's own error
            tracker.finish("FAILED", tags={"hpsweep.error": summary.splitlines()[0][:5000]})
            run_id = tracker.run_id
            tracker.client.log_text(run_id, "".join(traceback.format_exception(exc)), "error.txt")
    latest = run._latest if run is not None else {}
    # Optuna's searcher reads the metric from every result: no marker before it is known.
    if permanent and (context["metric"] in latest or not context.get("optuna")):
        with contextlib.suppress(BaseException):  # a scheduler's stop (SystemExit) included
            tune.report({**latest, "step": -1, _NO_RETRY: 1})
    return CellFailed(cell.id, summary, permanent, run_id)


def _trial(tune_config: dict, context: dict) -> None:
    """One cell: open (or reuse) its MLflow run, run the trainer, close the run."""
    import torch

    from trainers import load_trainer
    from trainers.common.config import trusted

    if "cell" in tune_config:
        cell = context["cells"][tune_config["cell"]]
    else:  # optuna: the sampler chose the values; validated here, once
        values = {k: tune_config[k] for k in context["swept"]}
        config = resolve_config(context["spec"], values, context["seed"])
        cell = Cell(cell_id(context["trainer"], config), -1, context["seed"], values, config)
    info = load_trainer(context["trainer"])
    # The planner validated this config (hpsweep.points); the trial trusts it.
    trainer_config = trusted(info.Config, cell.config)
    gpus = ray.get_gpu_ids()
    device = torch.device("cuda") if gpus and torch.cuda.is_available() else torch.device("cpu")
    torch.set_num_threads(max(1, int(context["cpus"])))
    runtime = ray.get_runtime_context()
    storage = open_storage(**context["storage"])
    lease = _hold_cell(storage, cell, context, force=bool(tune_config.get("force")))
    if lease is None:
        return
    checkpoint_path = (context["sweep"], "cells", cell.id, "checkpoint.pt")
    tracker = CellTracker(context["tracking_uri"], context["experiment_id"], context["parent_run_id"],
                          context["sweep"], cell, extra_tags={
                              TAG["node_ip"]: ray.util.get_node_ip_address(),
                              TAG["node_id"]: runtime.get_node_id(),
                              TAG["trial"]: tune.get_context().get_trial_id() or ""},
                          write_checkpoint=lambda data: (lease.check(), storage.write_bytes(data, *checkpoint_path)))
    run = _TuneRun(cell, storage, context["sweep"], tracker, context["every"], device, context["metric"],
                   context.get("bases"))
    run.lease = lease
    ended, done_info = FAILED, None
    try:
        info.train(trainer_config, run)
        tracker.finish("FINISHED")
        ended, done_info = DONE, {"sweep": context["sweep"], "experiment_id": context["experiment_id"],
                                  "run_id": tracker.run_id, "tracking_uri": context["tracking_uri"]}
    except LeaseLost:
        tracker.abandon()  # the cell's new holder owns the run now: leave its status alone
        raise
    except SystemExit:
        # Stopped by the scheduler or by an interruption: send what is buffered and mark the
        # run KILLED (resumable); the driver, which knows which of the two it was, turns the
        # scheduler's stops into FINISHED once the trials are done.
        ended = STOPPED
        with contextlib.suppress(Exception):
            tracker.close()
            if tracker.client.get_run(tracker.run_id).info.status == "RUNNING":
                tracker.client.set_terminated(tracker.run_id, status="KILLED")
        raise
    except Exception as exc:
        # Tune gets the short form; the full traceback is kept in the run and in Ray's log
        raise _fail(exc, cell, tracker, run, context) from exc
    except BaseException:
        with contextlib.suppress(Exception):  # never mask the trainer's own error
            tracker.finish("FAILED")
        raise
    finally:
        with contextlib.suppress(Exception):  # the renewals stop whatever happened
            lease.end(ended, done_info)


# --- leases: one cell, one runner, across drivers (the protocol is storage.HeldLease's) ------

_HELD_BY = "hpsweep/held_by"   # the result of a trial that found its cell held elsewhere


def _hold_cell(storage: Storage, cell: Cell, context: dict, force: bool = False) -> HeldLease | None:
    """Take the cell's lease before anything of the cell is touched; the trial holds it (and
    renews it) while the cell runs. When another live runner holds it, or it is done, the trial
    reports who (the driver waits for it, or adopts its run) and runs nothing."""
    lease, other = HeldLease.acquire(
        storage, cell.id, context["driver"], ttl=context["lease_ttl"],
        info={"sweep": context["sweep"], "trial": tune.get_context().get_trial_id() or ""},
        over=(DONE,) if force else ())  # a done record this sweep's MLflow lacks
    if lease is None:
        tune.report({_HELD_BY: other.owner if other else "?", "hpsweep/cell": cell.id,
                     "hpsweep/lease_state": other.state if other else "?"})
    return lease


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


def _init_ray(address: str | None, env: dict[str, str]) -> None:
    _keep_credentials_out_of_runtime_envs()
    # Tune's end-of-run analysis looks for the per-result JSON/CSV files that hpsweep turns
    # off (the metrics are in MLflow); its warning about them is noise.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": env}
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING",
                 log_to_driver=False)
    else:
        # In-process Ray for one machine: every port on loopback (see the top of this module),
        # no dashboard. Ray's default token authentication stays on (the token is under
        # ~/.ray); only its notice about it is kept off the user's screen.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, runtime_env=runtime_env,
                 logging_level="WARNING", log_to_driver=False, configure_logging=True)
        with contextlib.suppress(Exception):  # the embedded Ray ends with this process
            reaper.watch(ray._private.worker._global_node.get_session_dir_path())


def cluster_nodes(address: str) -> list[str]:
    """The addresses of the alive nodes of the cluster at ``address`` (connects, then lets go:
    ``run_sweep`` connects again with the trials' runtime environment)."""
    if ray.is_initialized():
        return sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    try:
        return sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})
    finally:
        ray.shutdown()


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

    def __init__(self, tracker: SweepTracker, asha, live: LiveTable) -> None:
        self.tracker, self.asha, self.live = tracker, asha, live
        self.completed: set[str] = set()
        self.errored: set[str] = set()
        self.failures: list[CellFailed] = []
        self.stopped: dict[str, bool] = {}   # trial id -> stopped early (ASHA)
        self.held: dict[str, tuple[str, str]] = {}  # cell id -> (owner, lease state): run elsewhere

    def __getstate__(self) -> dict:
        # Tuner pickles its run config for Tuner.restore, which hpsweep does not use (cell
        # ids make a rerun resume instead); the MLflow client and the console stay out of it.
        return {**self.__dict__, "tracker": None, "live": None}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.live.started(trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(_NO_RETRY):
            # the trial is about to raise an error a retry cannot fix: Tune's retries off
            trial.max_failures = 0
            return
        self.live.result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if _HELD_BY in result:  # the cell's lease was held by another driver: not run here
            cell = result["hpsweep/cell"]
            self.held[cell] = (result[_HELD_BY], result.get("hpsweep/lease_state", ""))
            self.live.elsewhere(trial.trial_id, cell, result[_HELD_BY])
            return
        self.completed.add(trial.trial_id)
        self.live.done(trial.trial_id, "done")
        if self.asha is not None:
            # ASHA also stops the trials that reach max_t, at their last report: only those
            # stopped before it were stopped early.
            reached = (trial.last_result or {}).get(self.asha.time_attr, 0) >= self.asha.max_t
            self.stopped[trial.trial_id] = not reached

    def on_trial_error(self, iteration, trials, trial, **info):
        self.errored.add(trial.trial_id)
        failure = _cell_failure(trial)
        if failure is not None:
            self.failures.append(failure)
        self.live.done(trial.trial_id, "failed",
                       error=failure.headline if failure else str(getattr(trial, "error_msg", "") or ""))

    def report_failures(self, note, cells: dict[str, Cell]) -> None:
        """Each distinct error once: the trainer's exception, its frames, the cells it hit."""
        groups: dict[str, list[CellFailed]] = {}
        for failure in self.failures:
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

    def finish_stopped(self, rounds: int = 3) -> None:
        """Close the runs of trials the scheduler stopped: they end KILLED or RUNNING (stopped
        inside a report); found by the trial id every attempt tags its run with. A few rounds,
        for workers still closing their runs when the sweep ends."""
        for i in range(rounds):
            for run in (r for rs in self.tracker.cell_runs().values() for r in rs):
                trial = run.data.tags.get(TAG["trial"])
                if trial in self.stopped and run.info.status in ("RUNNING", "KILLED"):
                    self.tracker.client.set_tag(run.info.run_id, TAG["early"],
                                                "true" if self.stopped[trial] else "false")
                    self.tracker.client.set_terminated(run.info.run_id, status="FINISHED")
            if i < rounds - 1:
                time.sleep(1.0)


def run_sweep(spec: SweepSpec, spec_text: str, *, tracking_uri: str, storage_uri: str | None = None,
              address: str | None = None, s3_endpoint: str | None = None, live: bool | None = None,
              console=None) -> SweepOutcome:
    """Run every cell of ``spec`` that has no finished run yet; see the module docstring.

    The sweep's parent run never stays RUNNING when this raises: a Ctrl-C during Ray's
    start-up (or any error before Tune takes over) ends it KILLED (FAILED for an error).
    """
    tracker = SweepTracker(tracking_uri, spec.name)
    try:
        return _run_sweep(spec, spec_text, tracker, tracking_uri=tracking_uri, storage_uri=storage_uri,
                          address=address, s3_endpoint=s3_endpoint, live=live, console=console)
    except BaseException as exc:
        if tracker.parent_run_id is not None:
            with contextlib.suppress(Exception):  # never mask the interruption or the error
                if tracker.client.get_run(tracker.parent_run_id).info.status == "RUNNING":
                    tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def _run_sweep(spec: SweepSpec, spec_text: str, tracker: SweepTracker, *, tracking_uri: str,
               storage_uri: str | None, address: str | None, s3_endpoint: str | None,
               live: bool | None, console) -> SweepOutcome:
    started = time.time()
    storage = open_storage(storage_uri, s3_endpoint)
    with storage.lock(f"sweep-{spec.name}"):  # drivers started together: one parent run
        parent = tracker.start(spec.spec_hash(), spec_text, spec.description, storage_uri=storage.uri)
    existing = tracker.cell_runs()
    finished = tracker.finished_cells(existing)

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

    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    env.update({"HPSWEEP_CODE_VERSION": code_version(), "RAY_CHDIR_TO_TRIAL_DIR": "0",
                "HPSWEEP_LEASE_TTL": str(lease_ttl())})
    _init_ray(address, env)

    context = {
        "trainer": spec.trainer, "sweep": spec.name, "tracking_uri": tracking_uri,
        "experiment_id": tracker.experiment_id, "parent_run_id": parent,
        "storage": storage.spec(), "every": spec.checkpoint.every, "cpus": spec.resources.cpus,
        "metric": spec.metric.name, "optuna": optuna, "bases": spec.data_bases(),
        "driver": driver_id(), "lease_ttl": lease_ttl(),
        "cells": {c.id: c for c in pending},
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
        queue = search_alg = _CellQueue(_spread(pending), storage, tracker, table, context)
    outcomes = _Outcomes(tracker, spec.scheduler if spec.scheduler.type == "asha" else None, table)
    fit_started = time.time()
    with table, _pending_trials(None if optuna else _slots(spec)):
        _tuner(spec, context, param_space, search_alg, outcomes, storage, todo if optuna else -1).fit()
    fit_s = time.time() - fit_started
    outcomes.report_failures(table.note, context["cells"])
    elsewhere = len(outcomes.held) if optuna else queue.elsewhere
    if outcomes.stopped:
        outcomes.finish_stopped()
    completed, failed = len(outcomes.completed), len(outcomes.errored)
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
            trial_name_creator=lambda t: f"cell_{t.config.get('cell', t.trial_id)}",
            trial_dirname_creator=lambda t: f"cell_{t.config.get('cell', t.trial_id)}",
        ),
        run_config=tune.RunConfig(
            # unique per driver and round: drivers of one sweep share the storage
            name=time.strftime("tune-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6],
            storage_path=storage.path(spec.name), storage_filesystem=storage.fs,
            failure_config=tune.FailureConfig(max_failures=spec.retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[outcomes], verbose=0, progress_reporter=_Silent(),
        ),
    )


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


class _CellQueue(Searcher):
    """The grid's cells to Tune one at a time, as it has room for a trial (a Tune searcher).

    A cell whose lease another driver holds, live or done, is passed over and waited for
    (polling its lease and MLflow); one whose lease expires unfinished (its driver died) or is
    released is handed out again, and its trial takes it over from its checkpoint. A lease
    record says how a waited-for cell ended: ``done`` in this sweep (its run is in MLflow),
    ``done`` in another sweep sharing the cell (its run is copied into this one), ``failed``
    (that driver's failure, not this one's). The search ends when every cell has been run
    here or settled elsewhere. Trials still take each lease atomically (``_hold_cell``): the
    look here only spares a trial for cells already taken."""

    def __init__(self, cells: list[Cell], storage: Storage, tracker: SweepTracker, table: LiveTable,
                 context: dict) -> None:
        super().__init__()
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

    def suggest(self, trial_id: str):
        while self.queue:
            cid = self.queue.popleft()
            lease = None if cid in self.force else self.storage.read_lease(cid)
            if lease is not None and (lease.live or lease.state == DONE):
                self.waiting[cid] = lease.owner
                self.table.elsewhere(None, cid, lease.owner)
                continue
            self.active += 1
            return {"cell": cid, **({"force": True} if cid in self.force else {})}
        if self.waiting and time.time() >= self._next_poll:
            self._next_poll = time.time() + self.poll
            self._settle()
            if self.queue:
                return self.suggest(trial_id)
        if not self.waiting and self.active <= 0:
            return Searcher.FINISHED
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.active -= 1
        if result and _HELD_BY in result:  # its trial lost the race for the lease
            self.waiting[result["hpsweep/cell"]] = result[_HELD_BY]

    def _settle(self) -> None:
        finished = self.tracker.finished_cells()
        taken = []
        for cid in list(self.waiting):
            lease = self.storage.read_lease(cid)
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


def _adopt(tracker: SweepTracker, storage: Storage, cell: Cell, lease: Lease) -> bool:
    """A cell done by another sweep that shares it (same content id), tracked in the same
    MLflow: its run is copied into this sweep (once: under a lock), not trained again."""
    info = lease.info
    if info.get("experiment_id") in (None, tracker.experiment_id) or \
            info.get("tracking_uri") != tracker.tracking_uri or not info.get("run_id"):
        return False
    with storage.lock(f"adopt-{tracker.experiment_id}-{cell.id}"):
        if cell.id in tracker.finished_cells():
            return True
        return tracker.adopt(cell, info["run_id"], info.get("sweep", ""))


class _Silent(tune.ProgressReporter):
    """Tune's own table is replaced by :class:`hpsweep.views.live.LiveTable`."""

    def should_report(self, trials, done=False):
        return False

    def report(self, trials, done, *sys_info):
        pass
