"""A trial, on a Ray worker: one cell, or a bundle of cells one after another, each under its
lease, with its own MLflow run and checkpoint (see :mod:`hpsweep.run.engine` for the driver).

Imports ``ray`` (the worker's node and GPUs) but never ``ray.tune``: the engine, the only user
of ``ray.tune``, hands each trial a :class:`Host`, Tune's ``report`` and the trial's id. The
result keys below are what a trial tells its driver besides the trainer's metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import ray

from hpsweep.run.cellrun import CELL, RUN_AGE, TrialRun
from hpsweep.spec.plan import Cell, cell_id, resolve_config
from hpsweep.store.checkpoints import CellCheckpoint
from hpsweep.store.leases import DONE, FAILED, RELEASED, STOPPED, HeldLease, LeaseLost
from hpsweep.store.mlflow import TAG
from hpsweep.store.storage import Storage, open_storage
from hpsweep.store.tracker import AlreadyFinished, CellTracker
from hpsweep.trainer.registry import base_here, source_of
from hpsweep.trainer.run import torch_threads

__all__ = ["Host", "TrialRun", "CellFailed", "run_trial", "CELL", "ENDED", "CELL_S", "RUN_AGE",
           "ENDED_BATCH", "FAILURE", "PERMANENT_KEY", "RUN_ID", "HELD_BY", "NO_RETRY", "LOST", "WARNING"]


@dataclasses.dataclass(frozen=True)
class Host:
    """What the trial needs of Ray Tune: its ``report`` (a result to the driver; waits until the
    driver took it) and the trial's id."""

    report: Callable[[dict[str, Any]], None]
    trial_id: str



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
        self.duration_s: float | None = None   # the failed run's, as MLflow has it

    def __str__(self) -> str:
        return f"cell {self.cell}: {self.summary}"

    @property
    def headline(self) -> str:
        return self.summary.splitlines()[0]


def _summary(exc: BaseException, source: str | None = None) -> str:
    """``Type: message`` and the frames of the traceback inside ``trainers/`` or the trainer's
    own directory ``source`` (the trainer's code; not hpsweep's, Ray's or a library's)."""
    import traceback
    from pathlib import Path

    import trainers

    roots = [Path(trainers.__file__).resolve().parent] + ([Path(source).resolve()] if source else [])
    head = f"{type(exc).__name__}: {exc}".strip()
    lines = [head.splitlines()[0][:500] if head else type(exc).__name__]
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename).resolve()
        root = next((r for r in roots if path.is_relative_to(r)), None)
        if root is not None:
            lines.append(f"  {path.relative_to(root.parent)}:{frame.lineno} in {frame.name}: "
                         f"{(frame.line or '').strip()}")
    from hpsweep.trainer.command.training import CommandFailed

    tail = [f"  | {line[:300]}" for line in exc.tail[-10:]] if isinstance(exc, CommandFailed) else []
    if tail:
        tail.insert(0, "  its last lines of output:")
    return "\n".join(lines[:1] + lines[1:][-6:] + tail)


def _fail(exc: Exception, cell: Cell, tracker: CellTracker | None, run: TrialRun | None,
          context: dict, host: Host, bundled: bool = False) -> CellFailed:
    """Record the trainer's exception in the cell's run (tag and full traceback) and tell Tune
    not to retry a permanent one; returns what the trial raises instead."""
    import traceback

    summary = _summary(exc, source_of(context["trainer"], base_here(context.get("trainer_base"))))
    permanent = isinstance(exc, _PERMANENT)
    run_id = None
    if tracker is not None:
        with contextlib.suppress(Exception):  # never mask the trainer's own error
            tracker.finish("FAILED", tags={TAG["error"]: summary.splitlines()[0][:5000]})
            run_id = tracker.run_id
            tracker.client.log_text(run_id, "".join(traceback.format_exception(exc)), "error.txt")
    latest = run._latest if run is not None else {}
    # Optuna's searcher reads the metric from every result: no marker before it is known.
    if permanent and not bundled and (context["metric"] in latest or not context.get("optuna")):
        with contextlib.suppress(BaseException):  # a scheduler's stop (SystemExit) included
            host.report({**latest, "step": -1, NO_RETRY: 1})
    failed = CellFailed(cell.id, summary, permanent, run_id)
    failed.duration_s = tracker.duration_s if tracker is not None else None
    return failed


#: result keys: which cell a result is of; that a bundle's cell ended (done or failed), how
#: long it took, and for a failure what the driver shows and whether a retry can help
ENDED, CELL_S = "hpsweep/ended", "hpsweep/cell_s"
ENDED_BATCH = "hpsweep/ended_batch"   # a bundle's ended cells since its last result (JSON)
_TELL_S = 1.0
FAILURE, PERMANENT_KEY, RUN_ID = "hpsweep/failure", "hpsweep/permanent", "hpsweep/run_id"
#: a cell this trial lost to another driver (its lease taken over): the new holder in HELD_BY
LOST = "hpsweep/lost"
#: something the driver shows the user once (a corrupt checkpoint set aside)
WARNING = "hpsweep/warning"


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
    closer = _Closer()
    try:
        for cid in tune_config["cells"]:
            try:
                _run_cell(context["cells"][cid], context, host, force=cid in force, teller=teller,
                          closer=closer)
            except CellFailed as failure:
                teller.ended(_failed(cid, failure, closer.started))
    finally:
        closer.drain()  # every cell handed to it is closed before the trial ends
    teller.flush()


def _failed(cid: str, failure: CellFailed, started: float) -> dict:
    took = failure.duration_s if failure.duration_s is not None else time.perf_counter() - started
    return {CELL: cid, ENDED: "failed", CELL_S: took,
            FAILURE: failure.summary, PERMANENT_KEY: int(failure.permanent), RUN_ID: failure.run_id or ""}


class _Closer:
    """Closes a bundle's cells in a thread of the bundle's own, while the next cell trains: the
    run's last metrics and its FINISHED status, the cell's mark, then its lease ended done (in
    that order, as for a cell alone), and the cell's end told to the driver. A bundle of short
    cells then waits for none of those round trips to the tracking server (about 40 ms a cell
    against a local one, measured; more against a remote one). Cells are closed in the order
    they finished; the bundle waits for the last before it ends (:meth:`drain`). One close
    waits at most while another runs: cells faster than their closes (instant ones) wait for
    them rather than pile up runs opened at once (a 10^4-cell bundle of instant cells, closes
    unbounded, had 15 connections waiting on the tracking server's pool and runs failing to open)."""

    def __init__(self) -> None:
        import queue
        import threading

        self.started = time.perf_counter()   # when the cell running now began
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._loop, name="hpsweep-closer", daemon=True)
        self._thread.start()

    def submit(self, close: Callable[[], None]) -> None:
        self._jobs.put(close)
        self.started = time.perf_counter()

    def _loop(self) -> None:
        while (close := self._jobs.get()) is not None:
            try:
                close()
            except BaseException:  # noqa: BLE001 - close() reports its own failures; go on
                import traceback

                traceback.print_exc()  # into the worker's log

    def drain(self) -> None:
        self._jobs.put(None)
        self._thread.join()


class _Teller:
    """What a bundle tells Tune: one result at most every ``_TELL_S`` seconds, holding the
    cells that ended since (``ENDED_BATCH``, JSON) and the latest progress of the cell running
    now; the rest at the bundle's end. Each ``tune.report`` waits for the driver to take the
    result (a round trip): a bundle of short cells makes one a second instead of two a cell.
    Under FIFO nothing but the live table needs every step, and MLflow has them all."""

    def __init__(self, report) -> None:
        import threading

        self.report = report
        self.ends: list[dict] = []
        self.warnings: list[str] = []
        self.latest: dict | None = None
        self.last = time.monotonic()
        self._lock = threading.Lock()   # the closer thread adds ends; only the trial reports

    def __call__(self, result: dict) -> None:   # a trainer's progress
        with self._lock:
            if WARNING in result:   # said once, never overwritten by progress
                self.warnings.append(result[WARNING])
            else:
                self.latest = result
        self._maybe()

    def take(self, cid: str) -> dict:
        """The last progress of cell ``cid`` (its marker carries it), taken out of the next result."""
        with self._lock:
            if self.latest is None or self.latest.get(CELL) != cid:
                return {}
            latest, self.latest = self.latest, None
        return {k: v for k, v in latest.items() if k not in (CELL, "step")}

    def ended(self, marker: dict, report: bool = True) -> None:
        """A cell ended; ``report=False`` from another thread than the trial's (only the
        trial may call Tune's report): sent with the trial's next result."""
        marker.update(self.take(marker[CELL]))
        with self._lock:
            self.ends.append(marker)
        if report:
            self._maybe()

    def _maybe(self) -> None:
        if time.monotonic() - self.last >= _TELL_S:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self.ends and self.latest is None and not self.warnings:
                return
            result = dict(self.latest or {"step": -1})
            if self.ends:
                result[ENDED_BATCH] = json.dumps(self.ends)
            if self.warnings:
                result[WARNING] = "\n".join(self.warnings)
            self.ends, self.warnings, self.latest, self.last = [], [], None, time.monotonic()
        self.report(result)


def _run_cell(cell: Cell, context: dict, host: Host, force: bool = False,
              teller: _Teller | None = None, closer: _Closer | None = None) -> bool:
    """One cell: take its lease, open (or reuse) its MLflow run, run the trainer, close the
    run (in a bundle, ``closer`` closes it and tells ``teller``, while the next cell runs).
    False if another runner holds the cell (reported to the driver; nothing run)."""
    from hpsweep.trainer.config import trusted
    from hpsweep.trainer.registry import load_trainer

    runtime = ray.get_runtime_context()
    storage = open_storage(**context["storage"])
    lease = _hold_cell(storage, cell, context, host, force=force)
    if lease is None:
        return False
    checkpoint = CellCheckpoint(storage, context["sweep"], context["experiment_id"], cell.id, lease)
    extra_tags = {TAG["node_ip"]: ray.util.get_node_ip_address(), TAG["node_id"]: runtime.get_node_id(),
                  TAG["trial"]: host.trial_id, TAG["pid"]: str(os.getpid())}
    extra_tags.update({TAG["code"]: context["code_version"]} if context.get("code_version") else {})
    try:  # an unreadable checkpoint is set aside (the cell starts again); an unsafe one fails it
        resume, warning = checkpoint.checked(None, cell.label())   # checked on the CPU: no device yet
    except BaseException:
        with contextlib.suppress(Exception):
            lease.end(FAILED)
        raise
    if warning:
        with contextlib.suppress(BaseException):
            (teller or host.report)({WARNING: warning, CELL: cell.id, "step": -1})
    tracker = CellTracker(context["tracking_uri"], context["experiment_id"], context["parent_run_id"],
                          context["sweep"], cell, extra_tags=extra_tags,
                          write_checkpoint=checkpoint.publish, guard=lease.check, fence=lease.confirm,
                          fresh=lease.lease.first and cell.id not in context["ran"])
    run = TrialRun(cell, storage, context["sweep"], tracker, context["every"], bool(ray.get_gpu_ids()),
                   context["metric"], context.get("bases"), tell=teller or host.report, cpus=context["cpus"])
    run.lease, run.resume = lease, resume
    ended: str | None = FAILED
    try:
        # Imported here, under the cell's lease and run: a trainer whose training module fails
        # to import fails its cell at once (ImportError is permanent), with the reason in its run.
        info = load_trainer(context["trainer"], cell.config, base_dir=base_here(context.get("trainer_base")))
        # The planner validated this config (hpsweep.spec.points); the trial trusts it.
        trainer_config = trusted(info.Config, cell.config)
        torch_threads(context["cpus"])   # a trainer that imported torch: its threads are the trial's CPUs
        info.train(trainer_config, run)
        tracker.trained()   # the run's end: closing (the last flush) is not the cell's time
        close = _closing(cell, context, host, storage, lease, tracker, run, teller, closer)
        ended = None  # from here ``close`` ends the lease
        if closer is None:
            close()
        else:
            closer.submit(close)
    except CellFailed:  # closing failed: close() recorded it
        raise
    except (LeaseLost, AlreadyFinished) as lost:
        # another attempt owns the cell now (or finished it): leave its run and checkpoint alone,
        # and tell the driver who has it; the driver waits for that one, counts nothing here
        tracker.abandon()
        checkpoint.discard()
        if isinstance(lost, AlreadyFinished):
            ended = RELEASED
        _tell_lost(cell.id, lost, host, teller)
    except SystemExit:
        # Stopped by the scheduler or by an interruption: send what is buffered and mark the
        # run KILLED (resumable); the driver, which knows which of the two it was, turns the
        # scheduler's stops into FINISHED once the trials are done.
        ended, stopped_ms = STOPPED, tracker.trained()
        with contextlib.suppress(Exception):
            tracker.close()
            if tracker.client.get_run(tracker.run_id).info.status == "RUNNING":
                tracker.client.set_terminated(tracker.run_id, status="KILLED", end_time=stopped_ms)
        raise
    except Exception as exc:
        # Tune gets the short form; the full traceback is kept in the run and in Ray's log
        raise _fail(exc, cell, tracker, run, context, host, bundled=teller is not None) from exc
    except BaseException:
        with contextlib.suppress(Exception):  # never mask the trainer's own error
            tracker.finish("FAILED")
        raise
    finally:
        if ended is not None:
            with contextlib.suppress(Exception):  # the renewals stop whatever happened
                lease.end(ended)
    return True


def _tell_lost(cid: str, lost: BaseException, host: Host, teller: _Teller | None) -> None:
    owner = getattr(lost, "owner", "") or ("an earlier attempt" if isinstance(lost, AlreadyFinished) else "?")
    marker = {CELL: cid, LOST: 1, HELD_BY: owner, "hpsweep/lease_state": "taken over"}
    if teller is not None:
        teller.ended({**marker, ENDED: "lost", CELL_S: 0.0})
    else:
        with contextlib.suppress(BaseException):
            host.report(marker)


def _closing(cell: Cell, context: dict, host: Host, storage: Storage, lease: HeldLease,
             tracker: CellTracker, run: TrialRun, teller: _Teller | None,
             closer: _Closer | None) -> Callable[[], None]:
    """What closes a cell whose trainer returned: its run FINISHED, then its mark in the
    sweep's finished index, then its lease ended done; in a bundle, the cell's end told to
    ``teller`` (a failure to close as the cell's failure)."""
    last = teller.take(cell.id) if teller is not None else {}
    started = closer.started if closer is not None else time.perf_counter()

    def close() -> None:
        ended, info = FAILED, None
        try:
            tracker.finish("FINISHED")
            if context.get("index"):  # after FINISHED: a mark never names an unfinished run
                with contextlib.suppress(Exception):  # a missing mark costs status a search
                    storage.mark_finished(context["index"], cell.id)
            ended, info = DONE, {"sweep": context["sweep"], "experiment_id": context["experiment_id"],
                                 "run_id": tracker.run_id, "tracking_uri": context["tracking_uri"]}
        except (LeaseLost, AlreadyFinished) as lost:
            tracker.abandon()  # the cell's new holder owns the run now: leave its status alone
            if closer is None:
                raise
            marker = {CELL: cell.id, LOST: 1, HELD_BY: getattr(lost, "owner", "") or "?", ENDED: "lost",
                      CELL_S: time.perf_counter() - started}
            teller.ended(marker, report=False)
        except Exception as exc:
            failure = _fail(exc, cell, tracker, run, context, host, bundled=teller is not None)
            if closer is None:
                raise failure from exc
            teller.ended(_failed(cell.id, failure, started), report=False)
        finally:
            with contextlib.suppress(Exception):  # the renewals stop whatever happened
                lease.end(ended, info)
        if ended == DONE and teller is not None:
            took = tracker.duration_s   # the run's own duration, as MLflow shows it
            teller.ended({CELL: cell.id, ENDED: "done",
                          CELL_S: took if took is not None else time.perf_counter() - started, **last},
                         report=closer is None)

    return close


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
