"""What became of each trial and cell of a sweep, as the driver hears it from Ray Tune (the engine
hands each trial event here): the live table's rows, which cells finished, failed, were held by
another driver or stopped early, the retries of bundled cells, and each distinct failure once."""

from __future__ import annotations

import contextlib
import json
import os
import time

import ray

from hpsweep.run.queue import CellQueue
from hpsweep.run.trial import (
    CELL,
    CELL_S,
    ENDED,
    ENDED_BATCH,
    FAILURE,
    HELD_BY,
    LOST,
    NO_RETRY,
    PERMANENT_KEY,
    RUN_AGE,
    RUN_ID,
    WARNING,
    CellFailed,
)
from hpsweep.spec.plan import Cell
from hpsweep.store.leases import driver_id
from hpsweep.store.mlflow import TAG, SweepTracker
from hpsweep.views.live import LiveTable

__all__ = ["Outcomes"]


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


def _age(result: dict) -> float | None:
    """Seconds since the result's cell run started, when the trial said."""
    return float(result[RUN_AGE]) if RUN_AGE in result else None


class Outcomes:
    """Which trials completed or failed (the rest were interrupted), and ASHA's early stops."""

    def __init__(self, tracker: SweepTracker, asha, live: LiveTable, queue: CellQueue | None = None,
                 retries: int = 0, storage=None) -> None:
        self.tracker, self.asha, self.live, self.storage = tracker, asha, live, storage
        self.lost: dict[str, str] = {}   # cell id -> the driver that took it over from this one
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
        return {**self.__dict__, "tracker": None, "live": None, "storage": None}

    @property
    def bundled(self) -> bool:
        return self.queue is not None

    def started(self, trial) -> None:
        if not self.bundled:  # a bundle's rows are its cells', made as they start
            self.live.started(trial.trial_id, trial.config)

    def result(self, trial, result: dict) -> None:
        if WARNING in result:
            for line in str(result[WARNING]).splitlines():
                self.live.note(f"warning: {line}")
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
        self.live.result(trial.trial_id, result, _age(result))

    # -- bundles: a row, a state and the retries per cell
    def _cell_result(self, trial_id: str, result: dict) -> None:
        cell = result[CELL]
        if result.get(LOST):  # taken over by another driver: the queue waits for it there
            self._lost(cell, result[HELD_BY], f"cell:{cell}")
            if self.current.get(trial_id) == cell:   # (the closer may tell it while the next runs)
                self.current.pop(trial_id)
            self.ended.setdefault(trial_id, set()).add(cell)
            return
        if HELD_BY in result:  # the queue waits for it
            self.held[cell] = (result[HELD_BY], result.get("hpsweep/lease_state", ""))
            self.live.elsewhere(None, cell, result[HELD_BY])
            return
        key = f"cell:{cell}"
        if self.current.get(trial_id) != cell:
            self.current[trial_id] = cell
            self.live.started(key, {"cell": cell})
        ended = result.get(ENDED)
        self.live.result(key, result, _age(result))
        if ended is None:
            return
        self.current.pop(trial_id, None)
        self.ended.setdefault(trial_id, set()).add(cell)
        took = float(result[CELL_S]) if CELL_S in result else None   # the run's, as MLflow has it
        if ended == "done":
            self.cell_state[cell] = "done"
            self.cell_failure.pop(cell, None)
            self.live.done(key, "done", took=took)
            return
        failure = CellFailed(cell, result.get(FAILURE, ""), bool(result.get(PERMANENT_KEY)),
                             result.get(RUN_ID) or None)
        failure.duration_s = took
        self._cell_failed(cell, failure, key)

    def _lost(self, cell: str, owner: str, key: str) -> None:
        if key not in self.live.rows:   # lost before its first result: a row with its label
            self.live.started(key, {"cell": cell})
        self.cell_state[cell] = "lost"
        self.lost[cell] = owner
        self.live.done(key, "lost", error=f"taken over by {owner}")
        self.live.elsewhere(None, cell, owner)

    def _release(self, cell: str | None, trial) -> None:
        """The trial ended in an error (its worker died, or hung and was killed): if the cell's
        lease is still held for it, release it now, so that its retry need not wait out the TTL.
        Safe even if the worker lives on: its writes are fenced like a stalled holder's."""
        if cell and self.storage is not None:
            with contextlib.suppress(Exception):
                self.storage.release_orphan(cell, driver_id(), trial.trial_id)

    def recover(self, trial) -> None:
        """Tune retries the trial (not bundled): its cell's lease goes first."""
        self._release(trial.config.get("cell"), trial)

    def _cell_failed(self, cell: str, failure: CellFailed, key: str) -> None:
        self.cell_state[cell] = "failed"
        self.cell_failure[cell] = failure
        self.attempts[cell] = self.attempts.get(cell, 0) + 1
        if not failure.permanent and self.attempts[cell] <= self.retries:
            self.queue.requeue([cell])  # from its last checkpoint, in a later bundle
            self.live.done(key, "retry", error=failure.headline, took=failure.duration_s)
        else:
            self.live.done(key, "failed", error=failure.headline, took=failure.duration_s)

    def _bundle_error(self, trial) -> None:
        """A bundle's worker died (or its lease was lost): the cell it ran failed this attempt;
        its cells not started go back to the queue."""
        cell = self.current.pop(trial.trial_id, None)
        ended = self.ended.pop(trial.trial_id, set())
        if cell is None:
            # died before its first result: blame the cell it was starting (the first not
            # ended), so that its retries bound what would otherwise go round for ever
            cell = next((c for c in trial.config.get("cells", ()) if c not in ended), None)
        self._release(cell, trial)
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

    def complete(self, trial) -> None:
        if self.bundled:
            self.current.pop(trial.trial_id, None)
            self.ended.pop(trial.trial_id, None)
            return
        result = trial.last_result or {}
        if result.get(LOST):  # run here until another driver took it over: waited for there
            self._lost(result[CELL], result[HELD_BY], trial.trial_id)
            return
        if HELD_BY in result:  # the cell's lease was held by another driver: not run here
            cell = result["hpsweep/cell"]
            self.held[cell] = (result[HELD_BY], result.get("hpsweep/lease_state", ""))
            self.live.elsewhere(trial.trial_id, cell, result[HELD_BY])
            return
        self.completed.add(trial.trial_id)
        stopped = False
        if self.asha is not None:
            # ASHA also stops the trials that reach max_t, at their last report: only those
            # stopped before it were stopped early.
            reached = (trial.last_result or {}).get(self.asha.time_attr, 0) >= self.asha.max_t
            self.stopped[trial.trial_id] = stopped = not reached
        self.live.done(trial.trial_id, "stopped" if stopped else "done")

    def error(self, trial) -> None:
        if self.bundled:
            self._bundle_error(trial)
            return
        self.errored.add(trial.trial_id)
        self._release(trial.config.get("cell"), trial)
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
                        # the run's own end (when its trainer stopped), not the sweep's
                        self.tracker.client.set_terminated(run.info.run_id, status="FINISHED",
                                                           end_time=run.info.end_time or None)
                        closed.add(cell)
            if i < rounds - 1:
                time.sleep(1.0)
        return closed
