"""A cell's run in MLflow, written from the worker that runs the cell: metrics buffered and sent
in batches from a background thread, the checkpoint persisted with the metrics it goes with, the
run closed with its status. The layout it writes is :mod:`hpsweep.store.mlflow`'s.

A run per attempt. Each attempt at a cell opens a run of its own and deletes the earlier
attempts' runs that did not finish (tagging each with its successor). The tracking server refuses
every write to a deleted run (``must be in the 'active' state``), so an earlier holder that
stalled past its lease, or was cut off, and writes on writes into nothing anyone reads: that is
the fence on the MLflow side (it needs no clock). An attempt that resumes from a checkpoint
continues the history: it copies the points of the run named by the checkpoint's pointer up to
the checkpoint's step (points written under the lease before the checkpoint was published, so
never a stale holder's), and drops its own points at those steps. An attempt that starts from
scratch copies nothing: two attempts' metrics never mix in one run."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from hpsweep.store.leases import LeaseLost
from hpsweep.store.mlflow import BATCH, PARENT, TAG, param_text
from hpsweep.store.rest import Metric, Param, RunTag, worker_client

__all__ = ["CellTracker", "AlreadyFinished"]


class AlreadyFinished(RuntimeError):
    """The cell has a FINISHED run in this sweep already: nothing is run again."""


def _superseded(exc: BaseException) -> bool:
    """The server refused a write because the run was deleted by a successor attempt."""
    return "must be in the 'active' state" in str(exc)

_FLUSH_S = 1.0
#: a flush waits at least this many times its last round trip, up to _MAX_FLUSH_S: when the
#: tracking server (or the storage) is saturated, every worker's round trips grow and each sends
#: fewer, larger batches, so that the load settles below saturation (64 workers at 17 ms a
#: request on the server would need 1.1 s of its CPU a second at one batch a second each)
_FLUSH_BACKOFF = 4.0
_MAX_FLUSH_S = 30.0
_MAX_FAILURES = 10     # consecutive failed flushes (about 10 s) before a trial gives up


class CellTracker:
    """The worker's side: one attempt's run of a cell (see the module docstring); metrics and
    checkpoints sent from a background thread so that the trainer never waits on the network.

    Checkpoints ride with the metrics: a checkpoint is queued only with the report that
    follows it, and the thread sends the metrics before it publishes the checkpoint, so a
    checkpoint in storage never runs ahead of the metrics in MLflow: the points up to a
    checkpoint's step are in the run its pointer names, which is what a resumed attempt copies
    (:meth:`continue_from`). It may lag behind them: points sent after the last checkpoint are
    not copied, and the resumed trainer sends those steps again. A finished cell's last
    checkpoint is published too (its state, in storage, like every cell's).
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep_name: str,
                 cell: Any, extra_tags: dict[str, str] | None = None, write_checkpoint=None,
                 fresh: bool = False, guard=None, fence=None) -> None:
        self.client = worker_client(tracking_uri)   # MLflow's REST API without MLflow, where it can
        # fresh: the caller knows the cell has no run in this sweep (none when its driver read
        # MLflow, and its lease never held before): no search for one to reuse
        self._fresh = fresh
        self.cell = cell
        # write_checkpoint(data, step, run_id): persists and publishes (fenced by the lease);
        # guard(): raises LeaseLost once the lease is lost (before each send, cheap); fence():
        # confirms the lease with the store (before the run is set FINISHED)
        self._write_checkpoint = write_checkpoint
        self._guard, self._fence = guard or (lambda: None), fence or (lambda: None)
        self._continue: tuple[str, int] | None = None   # (run, step) whose history to copy first
        self._resume_step: int | None = None
        self._checkpoint_step = 0
        self._buffer: list[Any] = []
        self._checkpoint: bytes | None = None
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._run_id: str | None = None
        self._params: list[Any] = []
        self._abandoned = False
        self._opened = threading.Event()
        self._finishing = False
        self.interval = _FLUSH_S   # seconds between flushes: longer while round trips are slow
        # The run's own times, as written to MLflow: every duration hpsweep shows (the live
        # lines, status, the API) is end_ms - start_ms of the cell's run, nothing else.
        # The end is when the trainer returned (or was stopped), not when the last flush landed.
        self.start_ms: int = int(time.time() * 1000)
        self.trained_ms: int | None = None
        self.end_ms: int | None = None
        # Opening the run (a search, a create, the params: three round trips) happens on the
        # background thread too: the trainer starts at once; reports wait in the buffer.
        self._thread = threading.Thread(target=self._loop, name="hpsweep-tracking", daemon=True,
                                        args=(experiment_id, parent_run_id, sweep_name, extra_tags or {}))
        self._thread.start()

    def trained(self) -> int:
        """The trainer returned or was stopped: the run's end time (ms), kept from the first call."""
        if self.trained_ms is None:
            self.trained_ms = max(int(time.time() * 1000), self.start_ms)
        return self.trained_ms

    @property
    def duration_s(self) -> float | None:
        """The run's duration as MLflow has it (None until :meth:`finish` set its end)."""
        return None if self.end_ms is None else (self.end_ms - self.start_ms) / 1000.0

    @property
    def run_id(self) -> str:
        self._opened.wait()
        if self._run_id is None:
            raise RuntimeError(f"the MLflow run of cell {self.cell.id} could not be opened: {self._error}")
        return self._run_id

    def check(self) -> None:
        """Raise on the trial's thread what went wrong on the tracking thread."""
        if isinstance(self._error, (LeaseLost, AlreadyFinished)):
            raise self._error
        if self._error is not None:
            raise RuntimeError(f"tracking of cell {self.cell.id} failed: {self._error}") from self._error

    def continue_from(self, run_id: str, step: int) -> None:
        """This attempt resumes from a checkpoint taken at report ``step`` of run ``run_id``:
        that run's history up to ``step`` is copied in before anything else is sent, and this
        attempt's own points at those steps are dropped."""
        with self._lock:
            if self._continue is None and self._resume_step is None:
                self._continue, self._resume_step = (run_id, int(step)), int(step)

    def _open_run(self, experiment_id: str, parent_run_id: str, sweep_name: str,
                  extra_tags: dict[str, str]) -> str:
        import hpsweep

        cell = self.cell
        existing = [] if self._fresh else self.client.search_runs(
            [experiment_id], f"tags.`{TAG['cell']}` = '{cell.id}' and tags.`{PARENT}` = '{parent_run_id}'",
            order_by=["attributes.start_time DESC"])
        if any(r.info.status == "FINISHED" for r in existing):
            raise AlreadyFinished(f"cell {cell.id} already has a finished run; refusing to run it twice")
        attempts = 1 + max((int(r.data.tags.get(TAG["attempts"], "1")) for r in existing), default=0)
        tags = {
            PARENT: parent_run_id, TAG["role"]: "cell", TAG["sweep"]: sweep_name,
            TAG["cell"]: cell.id, TAG["seed"]: str(cell.seed),
            TAG["params"]: json.dumps(cell.params, sort_keys=False),
            TAG["code"]: os.environ.get("HPSWEEP_CODE_VERSION", "unknown"),
            TAG["version"]: hpsweep.__version__, TAG["attempts"]: str(attempts), **extra_tags,
        }
        self._guard()
        run = self.client.create_run(experiment_id, start_time=self.start_ms,
                                     run_name=f"{cell.label()}"[:250], tags=tags)
        # The earlier attempts' runs go: the server refuses their writers from now on.
        for old in existing:
            with contextlib.suppress(Exception):
                self.client.set_tag(old.info.run_id, TAG["superseded_by"], run.info.run_id)
            self.client.delete_run(old.info.run_id)
        # The params go out with the first metrics (one request fewer a trial).
        self._params = [Param(k, param_text(v)) for k, v in cell.config.items()]
        return run.info.run_id

    def _copy_history(self, run_id: str, source: str, step: int) -> None:
        """Copy the points of run ``source`` at steps up to ``step`` into ``run_id`` (each step
        once: a request that was retried may have landed twice)."""
        keys = list(self.client.get_run(source).data.metrics)
        rows, seen = [], set()
        for key in keys:
            for m in sorted(self.client.get_metric_history(source, key), key=lambda m: (m.step, m.timestamp)):
                if m.step <= step and (key, m.step) not in seen:
                    seen.add((key, m.step))
                    rows.append(m)
        for i in range(0, len(rows), BATCH):
            self.client.log_batch(run_id, metrics=rows[i:i + BATCH])
        self.client.log_batch(run_id, tags=[RunTag(TAG["continues"], source)])

    def log(self, step: int, metrics: dict[str, float], checkpoint: bytes | None = None) -> None:
        """Buffer one report (and the checkpoint saved just before it). Costs microseconds."""
        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        with self._lock:
            self._buffer.extend(rows)
            if checkpoint is not None:
                self._checkpoint = checkpoint  # an older one not yet written is superseded
                self._checkpoint_step = int(step)

    def flush(self) -> None:
        """Send the buffered metrics, then write the checkpoint that came with them. On a
        failure what was taken goes back to the buffer, to be sent by the next flush."""
        with self._send_lock:
            if self._abandoned:
                return
            with self._lock:
                rows, self._buffer = self._buffer, []
                checkpoint, self._checkpoint = self._checkpoint, None
                checkpoint_step = self._checkpoint_step
                resume, resume_step = self._continue, self._resume_step
            sent = 0  # rows[:sent] are in MLflow
            try:
                run_id = self.run_id
                self._guard()   # a lost lease: nothing more is sent (the server fences the rest)
                if resume is not None:
                    self._copy_history(run_id, *resume)
                    with self._lock:
                        self._continue = None
                if resume_step is not None:  # a resumed attempt: the copied steps are not sent again
                    rows = [r for r in rows if r.step > resume_step]
                while self._params:  # the params ride with the first metrics, 100 a request
                    chunk = rows[sent:sent + BATCH - 100]
                    self.client.log_batch(run_id, metrics=chunk, params=self._params[:100])
                    self._params = self._params[100:]
                    sent += len(chunk)
                while sent < len(rows):
                    chunk = rows[sent:sent + BATCH]
                    self.client.log_batch(run_id, metrics=chunk)
                    sent += len(chunk)
                self._test_pause("metrics_sent")
                if checkpoint is not None and self._write_checkpoint is not None:
                    self._write_checkpoint(checkpoint, checkpoint_step, run_id)
                    checkpoint = None
                self._test_pause("checkpoint_written")
            except Exception as exc:
                if _superseded(exc):  # a successor deleted this attempt's run
                    raise LeaseLost(f"cell {self.cell.id}: its run {run_id} was superseded by "
                                    "another attempt") from None
                with self._lock:
                    self._buffer[:0] = rows[sent:]
                    if self._checkpoint is None:
                        self._checkpoint, self._checkpoint_step = checkpoint, checkpoint_step
                raise

    def _loop(self, experiment_id: str, parent_run_id: str, sweep_name: str,
              extra_tags: dict[str, str]) -> None:
        try:
            self._run_id = self._open_run(experiment_id, parent_run_id, sweep_name, extra_tags)
        except Exception as exc:
            self._error = exc
            return
        finally:
            self._opened.set()
        failures = 0
        while not self._stop:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                started = time.perf_counter()
                self.flush()
                self.interval = min(_MAX_FLUSH_S, max(_FLUSH_S, _FLUSH_BACKOFF * (time.perf_counter() - started)))
                failures = 0
            except LeaseLost as exc:  # the cell is another attempt's now: stop here
                self._error = exc
                self._abandoned = True
                return
            except Exception as exc:  # a blip is retried; a lasting failure stops the trial
                failures += 1
                if failures >= _MAX_FAILURES:
                    self._error = exc
                    return

    def log_artifact(self, path: str) -> None:
        self.client.log_artifact(self.run_id, path)

    def close(self) -> None:
        """Stop the background thread and send what is buffered, then write the checkpoint that
        came with it; the status is left as is."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=60)
        for attempt in range(_MAX_FAILURES):
            try:
                self.flush()
                break
            except LeaseLost:
                raise
            except Exception:
                if attempt == _MAX_FAILURES - 1:
                    raise
                time.sleep(min(0.1 * 2 ** attempt, 2.0))

    def abandon(self) -> None:
        """Stop the background thread and drop what is buffered, unsent (the cell was taken
        over by another runner: nothing more is written for it from here)."""
        self._stop = self._abandoned = True
        with self._lock:
            self._buffer, self._checkpoint = [], None
        self._wake.set()

    def finish(self, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
        """Send what is buffered, then set the run's final status (synchronously)."""
        self._finishing = True
        # The last checkpoint is written even for a FINISHED cell: until set_terminated below
        # the cell may still be resumed (an interruption here), and storage holds every
        # cell's final state.
        self.close()
        if isinstance(self._error, LeaseLost):
            raise self._error
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._test_pause("before_terminated")
        if status == "FINISHED":
            self._fence()   # the lease confirmed by the store: this attempt's run is the cell's
        end_ms = self.trained()
        try:
            self.client.set_terminated(self.run_id, status=status, end_time=end_ms)
            self.end_ms = end_ms
        except Exception as exc:
            if _superseded(exc):
                raise LeaseLost(f"cell {self.cell.id}: its run was superseded by another attempt") from None
            raise

    def _test_pause(self, point: str) -> None:
        """Test hook for the crash windows at a cell's end: with ``HPSWEEP_TEST_PAUSE_AT=<point>``
        (one of ``metrics_sent``, ``checkpoint_written``, ``before_terminated``) and
        ``HPSWEEP_TEST_PAUSE_DIR`` set, the first time a cell's ``finish`` reaches that point
        the tracker writes ``<dir>/<cell id>.<point>`` holding its pid and sleeps
        ``HPSWEEP_TEST_PAUSE_S`` seconds (default 20), so that a test can deliver a signal
        there. Does nothing when the variables are unset."""
        if not self._finishing or os.environ.get("HPSWEEP_TEST_PAUSE_AT") != point:
            return
        folder = os.environ.get("HPSWEEP_TEST_PAUSE_DIR")
        if not folder:
            return
        marker = Path(folder) / f"{self.cell.id}.{point}"
        staged = marker.with_name(f".{marker.name}.{os.getpid()}")
        staged.write_text(str(os.getpid()))
        try:
            os.link(staged, marker)  # atomic, and only once per cell and point
        except FileExistsError:
            return
        finally:
            staged.unlink()
        time.sleep(float(os.environ.get("HPSWEEP_TEST_PAUSE_S", "20")))
