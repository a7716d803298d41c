"""A trial, on a Ray worker: one cell, or a bundle of cells one after another, each under its
lease, with its own MLflow run and checkpoint (see :mod:`hpsweep.engine` for the driver).

Imports ``ray`` (the worker's node and GPUs) but never ``ray.tune``: the engine, the only user
of ``ray.tune``, hands each trial a :class:`Host`, Tune's ``report`` and the trial's id. The
result keys below are what a trial tells its driver besides the trainer's metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import ray

from hpsweep.plan import Cell, cell_id, resolve_config
from hpsweep.storage import DONE, FAILED, STOPPED, HeldLease, LeaseLost, Storage, open_storage
from hpsweep.store import TAG, CellTracker

__all__ = ["Host", "TrialRun", "CellFailed", "run_trial", "CELL", "ENDED", "CELL_S", "ENDED_BATCH",
           "FAILURE", "PERMANENT_KEY", "RUN_ID", "HELD_BY", "NO_RETRY"]


@dataclasses.dataclass(frozen=True)
class Host:
    """What the trial needs of Ray Tune: its ``report`` (a result to the driver; waits until the
    driver took it) and the trial's id."""

    report: Callable[[dict[str, Any]], None]
    trial_id: str



class TrialRun:
    """The trainer's ``run`` inside a trial: MLflow through the cell's tracker, checkpoints in
    the sweep's storage under the cell id, outputs in the storage's ``outputs/`` (logged as
    artifacts too), progress to Tune."""

    def __init__(self, cell: Cell, storage: Storage, sweep: str, tracker: CellTracker,
                 every: int, device, metric: str, bases: list[str] | None = None, tell=None) -> None:
        self.cell, self.storage, self.sweep, self.tracker = cell, storage, sweep, tracker
        self.tell = tell or (lambda result: None)  # a bundle's _Teller, or Tune's report
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
        self.tell({**self._latest, **values, "step": int(step), CELL: self.cell.id})

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
NO_RETRY = "hpsweep/no_retry"


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


def _fail(exc: Exception, cell: Cell, tracker: CellTracker | None, run: TrialRun | None,
          context: dict, host: Host, bundled: bool = False) -> CellFailed:
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
    if permanent and not bundled and (context["metric"] in latest or not context.get("optuna")):
        with contextlib.suppress(BaseException):  # a scheduler's stop (SystemExit) included
            host.report({**latest, "step": -1, NO_RETRY: 1})
    return CellFailed(cell.id, summary, permanent, run_id)


#: result keys: which cell a result is of; that a bundle's cell ended (done or failed), how
#: long it took, and for a failure what the driver shows and whether a retry can help
CELL, ENDED, CELL_S = "hpsweep/cell", "hpsweep/ended", "hpsweep/cell_s"
ENDED_BATCH = "hpsweep/ended_batch"   # a bundle's ended cells since its last result (JSON)
_TELL_S = 1.0
FAILURE, PERMANENT_KEY, RUN_ID = "hpsweep/failure", "hpsweep/permanent", "hpsweep/run_id"


def run_trial(tune_config: dict, context: dict, host: Host) -> None:
    """A trial: one cell, or a bundle of cells (``{"cells": [...]}``) run one after another."""
    if "cells" in tune_config:
        _bundle_trial(tune_config, context, host)
        return
    if "cell" in tune_config:
        cell = context["cells"][tune_config["cell"]]
    else:  # optuna: the sampler chose the values; validated here, once
        values = {k: tune_config[k] for k in context["swept"]}
        config = resolve_config(context["spec"], values, context["seed"])
        cell = Cell(cell_id(context["trainer"], config), -1, context["seed"], values, config)
    _run_cell(cell, context, host, force=bool(tune_config.get("force")))


def _bundle_trial(tune_config: dict, context: dict, host: Host) -> None:
    """The cells of a bundle one after another in this worker, each under its own lease, with
    its own MLflow run and checkpoint, exactly as if each had a trial. A cell's failure is
    reported (the driver retries it in a later bundle if a retry can help) and the next cell
    goes on; an interruption, a scheduler's stop or a lost lease ends the bundle (the driver
    hands its cells out again)."""
    force = set(tune_config.get("force", ()))
    teller = _Teller(host.report)
    for cid in tune_config["cells"]:
        t0 = time.perf_counter()
        try:
            ran = _run_cell(context["cells"][cid], context, host, force=cid in force, teller=teller)
        except CellFailed as failure:
            teller.ended({CELL: cid, ENDED: "failed", CELL_S: time.perf_counter() - t0,
                          FAILURE: failure.summary, PERMANENT_KEY: int(failure.permanent),
                          RUN_ID: failure.run_id or ""})
            continue
        if ran:
            teller.ended({CELL: cid, ENDED: "done", CELL_S: time.perf_counter() - t0})
    teller.flush()


class _Teller:
    """What a bundle tells Tune: one result at most every ``_TELL_S`` seconds, holding the
    cells that ended since (``ENDED_BATCH``, JSON) and the latest progress of the cell running
    now; the rest at the bundle's end. Each ``tune.report`` waits for the driver to take the
    result (a round trip): a bundle of short cells makes one a second instead of two a cell.
    Under FIFO nothing but the live table needs every step, and MLflow has them all."""

    def __init__(self, report) -> None:
        self.report = report
        self.ends: list[dict] = []
        self.latest: dict | None = None
        self.last = time.monotonic()

    def __call__(self, result: dict) -> None:   # a trainer's progress
        self.latest = result
        self._maybe()

    def ended(self, marker: dict) -> None:
        self.ends.append(marker)
        if self.latest is not None and self.latest.get(CELL) == marker[CELL]:
            marker.update({k: v for k, v in self.latest.items() if k not in (CELL, "step")})
            self.latest = None  # the marker carries the cell's last metrics
        self._maybe()

    def _maybe(self) -> None:
        if time.monotonic() - self.last >= _TELL_S:
            self.flush()

    def flush(self) -> None:
        if not self.ends and self.latest is None:
            return
        result = dict(self.latest or {"step": -1})
        if self.ends:
            result[ENDED_BATCH] = json.dumps(self.ends)
        self.ends, self.latest, self.last = [], None, time.monotonic()
        self.report(result)


def _run_cell(cell: Cell, context: dict, host: Host, force: bool = False,
              teller: _Teller | None = None) -> bool:
    """One cell: take its lease, open (or reuse) its MLflow run, run the trainer, close the
    run. False if another runner holds the cell (reported to the driver; nothing run)."""
    import torch

    from trainers import load_trainer
    from trainers.common.config import trusted

    info = load_trainer(context["trainer"])
    # The planner validated this config (hpsweep.points); the trial trusts it.
    trainer_config = trusted(info.Config, cell.config)
    gpus = ray.get_gpu_ids()
    device = torch.device("cuda") if gpus and torch.cuda.is_available() else torch.device("cpu")
    torch.set_num_threads(max(1, int(context["cpus"])))
    runtime = ray.get_runtime_context()
    storage = open_storage(**context["storage"])
    lease = _hold_cell(storage, cell, context, host, force=force)
    if lease is None:
        return False
    checkpoint_path = (context["sweep"], "cells", cell.id, "checkpoint.pt")
    tracker = CellTracker(context["tracking_uri"], context["experiment_id"], context["parent_run_id"],
                          context["sweep"], cell, extra_tags={
                              TAG["node_ip"]: ray.util.get_node_ip_address(),
                              TAG["node_id"]: runtime.get_node_id(),
                              TAG["trial"]: host.trial_id},
                          write_checkpoint=lambda data: (lease.check(), storage.write_bytes(data, *checkpoint_path)),
                          fresh=lease.lease.first and cell.id not in context["ran"])
    run = TrialRun(cell, storage, context["sweep"], tracker, context["every"], device, context["metric"],
                   context.get("bases"), tell=teller or host.report)
    run.lease = lease
    ended, done_info = FAILED, None
    try:
        info.train(trainer_config, run)
        tracker.finish("FINISHED")
        if context.get("index"):  # after FINISHED: a mark never names an unfinished run
            with contextlib.suppress(Exception):  # a missing mark costs status a search
                storage.mark_finished(context["index"], cell.id)
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
        raise _fail(exc, cell, tracker, run, context, host, bundled=teller is not None) from exc
    except BaseException:
        with contextlib.suppress(Exception):  # never mask the trainer's own error
            tracker.finish("FAILED")
        raise
    finally:
        with contextlib.suppress(Exception):  # the renewals stop whatever happened
            lease.end(ended, done_info)
    return True


# --- leases: one cell, one runner, across drivers (the protocol is storage.HeldLease's) ------

HELD_BY = "hpsweep/held_by"   # the result of a trial that found its cell held elsewhere


def _hold_cell(storage: Storage, cell: Cell, context: dict, host: Host,
               force: bool = False) -> HeldLease | None:
    """Take the cell's lease before anything of the cell is touched; the trial holds it (and
    renews it) while the cell runs. When another live runner holds it, or it is done, the trial
    reports who (the driver waits for it, or adopts its run) and runs nothing."""
    lease, other = HeldLease.acquire(
        storage, cell.id, context["driver"], ttl=context["lease_ttl"],
        info={"sweep": context["sweep"], "trial": host.trial_id},
        over=(DONE,) if force else ())  # a done record this sweep's MLflow lacks
    if lease is None:
        host.report({HELD_BY: other.owner if other else "?", CELL: cell.id,
                     "hpsweep/lease_state": other.state if other else "?"})
    return lease
