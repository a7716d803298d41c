"""The engine: the plan's pending cells become Ray Tune trials. The only module that imports
``ray.tune``.

Ray Tune does the running (resources, concurrency, retries, schedulers, search algorithms);
hpsweep decides what to run. Exactly once comes from the cell ids, not from Tune's experiment
state: every invocation asks MLflow which cells already have a FINISHED run and gives Tune
only the others; a cell that died resumes from the checkpoint stored under its id; its
MLflow run is reused. So a rerun after Ctrl-C, a crash, or with more seeds added runs what
is missing and nothing twice, which ``Tuner.restore`` cannot do once the spec has changed.

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

import ray  # noqa: E402
from ray import tune  # noqa: E402

from hpsweep.plan import Cell, cell_id, plan, resolve_config  # noqa: E402
from hpsweep.spec import SweepSpec  # noqa: E402
from hpsweep.storage import Storage, open_storage  # noqa: E402
from hpsweep.store import TAG, CellTracker, SweepTracker, code_version  # noqa: E402
from hpsweep.views.live import LiveTable  # noqa: E402

__all__ = ["SweepOutcome", "run_sweep"]

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

    def report(self, step: int, **metrics: float) -> None:
        values = {k: float(v) for k, v in metrics.items()}
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
    checkpoint_path = (context["sweep"], "cells", cell.id, "checkpoint.pt")
    tracker = CellTracker(context["tracking_uri"], context["experiment_id"], context["parent_run_id"],
                          context["sweep"], cell, extra_tags={
                              TAG["node_ip"]: ray.util.get_node_ip_address(),
                              TAG["node_id"]: runtime.get_node_id(),
                              TAG["trial"]: tune.get_context().get_trial_id() or ""},
                          write_checkpoint=lambda data: storage.write_bytes(data, *checkpoint_path))
    run = _TuneRun(cell, storage, context["sweep"], tracker, context["every"], device, context["metric"],
                   context.get("bases"))
    try:
        info.train(trainer_config, run)
    except SystemExit:
        # Stopped by the scheduler or by an interruption: send what is buffered and mark the
        # run KILLED (resumable); the driver, which knows which of the two it was, turns the
        # scheduler's stops into FINISHED once the trials are done.
        with contextlib.suppress(Exception):
            tracker.close()
            if tracker.client.get_run(tracker.run_id).info.status == "RUNNING":
                tracker.client.set_terminated(tracker.run_id, status="KILLED")
        raise
    except BaseException:
        with contextlib.suppress(Exception):  # never mask the trainer's own error
            tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")


# --- the driver -----------------------------------------------------------------------------

def _scheduler(spec: SweepSpec):
    if spec.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        s = spec.scheduler
        return ASHAScheduler(time_attr=s.time_attr, max_t=s.max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    return None


def _init_ray(address: str | None, env: dict[str, str]) -> None:
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
        # In-process Ray for one machine: loopback address, no dashboard. Ray's default token
        # authentication stays on (it binds some ports on every interface; the token, under
        # ~/.ray, guards them); only its notice about it is kept off the user's screen.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, runtime_env=runtime_env,
                 logging_level="WARNING", log_to_driver=False, configure_logging=True)


class _Outcomes(tune.Callback):
    """Which trials completed or failed (the rest were interrupted), and ASHA's early stops."""

    def __init__(self, tracker: SweepTracker, asha, live: LiveTable) -> None:
        self.tracker, self.asha, self.live = tracker, asha, live
        self.completed: set[str] = set()
        self.errored: set[str] = set()
        self.stopped: dict[str, bool] = {}   # trial id -> stopped early (ASHA)

    def __getstate__(self) -> dict:
        # Tuner pickles its run config for Tuner.restore, which hpsweep does not use (cell
        # ids make a rerun resume instead); the MLflow client and the console stay out of it.
        return {**self.__dict__, "tracker": None, "live": None}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.live.started(trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.live.result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completed.add(trial.trial_id)
        self.live.done(trial.trial_id, "done")
        if self.asha is not None:
            # ASHA also stops the trials that reach max_t, at their last report: only those
            # stopped before it were stopped early.
            reached = (trial.last_result or {}).get(self.asha.time_attr, 0) >= self.asha.max_t
            self.stopped[trial.trial_id] = not reached

    def on_trial_error(self, iteration, trials, trial, **info):
        self.errored.add(trial.trial_id)
        self.live.done(trial.trial_id, "failed", error=str(getattr(trial, "error_msg", "") or ""))

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
    """Run every cell of ``spec`` that has no finished run yet; see the module docstring."""
    started = time.time()
    storage = open_storage(storage_uri, s3_endpoint)
    tracker = SweepTracker(tracking_uri, spec.name)
    parent = tracker.start(spec.spec_hash(), spec_text, spec.description)
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
    env.update({"HPSWEEP_CODE_VERSION": code_version(), "RAY_CHDIR_TO_TRIAL_DIR": "0"})
    _init_ray(address, env)

    context = {
        "trainer": spec.trainer, "sweep": spec.name, "tracking_uri": tracking_uri,
        "experiment_id": tracker.experiment_id, "parent_run_id": parent,
        "storage": storage.spec(), "every": spec.checkpoint.every, "cpus": spec.resources.cpus,
        "metric": spec.metric.name, "bases": spec.data_bases(),
        "cells": {c.id: c for c in pending},
    }
    search_alg = None
    if optuna:
        from ray.tune.search.optuna import OptunaSearch

        domains = dict(spec.parameters)
        param_space = {k: d.to_tune(tune) for k, d in domains.items()}
        context.update({"swept": list(domains), "seed": spec.seed_list[0], "spec": spec})
        search_alg = OptunaSearch(metric=spec.metric.name, mode=spec.metric.mode)
    else:
        param_space = {"cell": tune.grid_search([c.id for c in pending])}
    resources = {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus}
    trainable = tune.with_resources(tune.with_parameters(_trial, context=context), resources)
    outcomes = _Outcomes(tracker, spec.scheduler if spec.scheduler.type == "asha" else None, table)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=spec.metric.name, mode=spec.metric.mode, num_samples=todo if optuna else 1,
            search_alg=search_alg, scheduler=_scheduler(spec),
            max_concurrent_trials=spec.max_concurrent or None, reuse_actors=True,
            trial_name_creator=lambda t: f"cell_{t.config.get('cell', t.trial_id)}",
            trial_dirname_creator=lambda t: f"cell_{t.config.get('cell', t.trial_id)}",
        ),
        run_config=tune.RunConfig(
            name=time.strftime("tune-%Y%m%d-%H%M%S"),
            storage_path=storage.path(spec.name), storage_filesystem=storage.fs,
            failure_config=tune.FailureConfig(max_failures=spec.retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[outcomes], verbose=0, progress_reporter=_Silent(),
        ),
    )
    fit_started = time.time()
    with table:
        tuner.fit()
    fit_s = time.time() - fit_started
    if outcomes.stopped:
        outcomes.finish_stopped()
    completed, failed = len(outcomes.completed), len(outcomes.errored)
    interrupted = todo - completed - failed
    if interrupted > 0:
        # Trials killed by the interruption leave RUNNING runs: mark them KILLED; a rerun
        # resumes those cells (same runs, from their checkpoints).
        unfinished = [c for c, rs in tracker.cell_runs().items()
                      if not any(r.info.status == "FINISHED" for r in rs)]
        tracker.settle(unfinished, "KILLED")
        tracker.finish("KILLED")
    else:
        tracker.finish("FAILED" if failed else "FINISHED")
    return SweepOutcome(total, skipped, completed, failed, max(0, interrupted), parent,
                        tracker.experiment_id, time.time() - started, fit_s)


class _Silent(tune.ProgressReporter):
    """Tune's own table is replaced by :class:`hpsweep.views.live.LiveTable`."""

    def should_report(self, trials, done=False):
        return False

    def report(self, trials, done, *sys_info):
        pass
