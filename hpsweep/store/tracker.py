"""A cell's run in MLflow, written from the worker that runs the cell: metrics buffered and sent
in batches from a background thread, the checkpoint persisted with the metrics it goes with, the
run closed with its status. The layout it writes is :mod:`hpsweep.store.mlflow`'s."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from hpsweep.store.mlflow import BATCH, PARENT, TAG, mlflow_client, param_text

__all__ = ["CellTracker"]

_FLUSH_S = 1.0
_MAX_FAILURES = 10     # consecutive failed flushes (about 10 s) before a trial gives up


class CellTracker:
    """The worker's side: one cell's run, reused across attempts; metrics and checkpoints
    sent from a background thread so that the trainer never waits on the network.

    Checkpoints ride with the metrics: a checkpoint is queued only with the report that
    follows it, and the thread sends the metrics before it writes the checkpoint, so a
    checkpoint in storage never runs ahead of the metrics in MLflow (a resumed cell leaves
    no gap in its history). It may lag behind them: an interruption after the metrics went
    out and before the checkpoint (or the run's status) was written leaves steps in MLflow
    that the resumed trainer runs again. So a reused run's last logged step per metric is
    read when it is opened, and the points a resumed attempt reports at those steps or
    before are dropped: each step is in the history once, whatever the interruption. A
    finished cell's last checkpoint is written too (its state, in storage, like every
    cell's).
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep_name: str,
                 cell: Any, extra_tags: dict[str, str] | None = None, write_checkpoint=None,
                 fresh: bool = False) -> None:
        self.client = mlflow_client(tracking_uri)
        # fresh: the caller knows the cell has no run in this sweep (none when its driver read
        # MLflow, and its lease never held before): no search for one to reuse
        self._fresh = fresh
        self.cell = cell
        self._write_checkpoint = write_checkpoint
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
        self._logged: dict[str, int] = {}   # metric -> last step in MLflow before this attempt
        # Opening the run (a search, a create, the params: three round trips) happens on the
        # background thread too: the trainer starts at once; reports wait in the buffer.
        self._thread = threading.Thread(target=self._loop, name="hpsweep-tracking", daemon=True,
                                        args=(experiment_id, parent_run_id, sweep_name, extra_tags or {}))
        self._thread.start()

    @property
    def run_id(self) -> str:
        self._opened.wait()
        if self._run_id is None:
            raise RuntimeError(f"the MLflow run of cell {self.cell.id} could not be opened: {self._error}")
        return self._run_id

    def check(self) -> None:
        """Raise on the trial's thread what went wrong on the tracking thread."""
        if self._error is not None:
            raise RuntimeError(f"tracking of cell {self.cell.id} failed: {self._error}") from self._error

    def _open_run(self, experiment_id: str, parent_run_id: str, sweep_name: str,
                  extra_tags: dict[str, str]) -> str:
        from mlflow.entities import Param, RunStatus, RunTag

        import hpsweep

        cell = self.cell
        existing = [] if self._fresh else self.client.search_runs(
            [experiment_id], f"tags.`{TAG['cell']}` = '{cell.id}' and tags.`{PARENT}` = '{parent_run_id}'",
            order_by=["attributes.start_time DESC"])
        if any(r.info.status == "FINISHED" for r in existing):
            raise RuntimeError(f"cell {cell.id} already has a finished run; refusing to run it twice")
        if existing:
            run_id = existing[0].info.run_id
            # the latest value of each metric is the one at its highest step (MLflow's
            # latest_metrics); every step below it was sent before it (in order)
            self._logged = {m.key: m.step for m in existing[0].data.to_proto().metrics}
            attempts = int(existing[0].data.tags.get(TAG["attempts"], "1")) + 1
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            tags = [RunTag(TAG["attempts"], str(attempts))]
            tags += [RunTag(k, v) for k, v in extra_tags.items()]
            self.client.log_batch(run_id, tags=tags)
            return run_id
        tags = {
            PARENT: parent_run_id, TAG["role"]: "cell", TAG["sweep"]: sweep_name,
            TAG["cell"]: cell.id, TAG["seed"]: str(cell.seed),
            TAG["params"]: json.dumps(cell.params, sort_keys=False),
            TAG["code"]: os.environ.get("HPSWEEP_CODE_VERSION", "unknown"),
            TAG["version"]: hpsweep.__version__, TAG["attempts"]: "1", **extra_tags,
        }
        run = self.client.create_run(experiment_id, run_name=f"{cell.label()}"[:250], tags=tags)
        # The params go out with the first metrics (one request fewer a trial).
        self._params = [Param(k, param_text(v)) for k, v in cell.config.items()]
        return run.info.run_id

    def log(self, step: int, metrics: dict[str, float], checkpoint: bytes | None = None) -> None:
        """Buffer one report (and the checkpoint saved just before it). Costs microseconds."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        with self._lock:
            self._buffer.extend(rows)
            if checkpoint is not None:
                self._checkpoint = checkpoint  # an older one not yet written is superseded

    def flush(self) -> None:
        """Send the buffered metrics, then write the checkpoint that came with them. On a
        failure what was taken goes back to the buffer, to be sent by the next flush."""
        with self._send_lock:
            if self._abandoned:
                return
            with self._lock:
                rows, self._buffer = self._buffer, []
                checkpoint, self._checkpoint = self._checkpoint, None
            sent = 0  # rows[:sent] are in MLflow
            try:
                run_id = self.run_id
                if self._logged:  # a resumed attempt: what an earlier one sent is not sent again
                    rows = [r for r in rows if r.key not in self._logged or r.step > self._logged[r.key]]
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
                    self._write_checkpoint(checkpoint)
                    checkpoint = None
                self._test_pause("checkpoint_written")
            except Exception:
                with self._lock:
                    self._buffer[:0] = rows[sent:]
                    if self._checkpoint is None:
                        self._checkpoint = checkpoint
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
            self._wake.wait(_FLUSH_S)
            self._wake.clear()
            try:
                self.flush()
                failures = 0
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
        from mlflow.entities import RunTag

        self._finishing = True
        # The last checkpoint is written even for a FINISHED cell: until set_terminated below
        # the cell may still be resumed (an interruption here), and storage holds every
        # cell's final state.
        self.close()
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._test_pause("before_terminated")
        self.client.set_terminated(self.run_id, status=status)

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
