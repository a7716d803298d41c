"""MLflow conventions, the write side (the read side is :mod:`hpsweep.runs`).

- experiment = sweep name; one parent run per sweep (tag ``hpsweep.role=sweep``), the sweep
  YAML logged as its artifact ``sweep.yaml``;
- one child run per cell, tagged ``hpsweep.role=cell``, ``hpsweep.sweep``, ``hpsweep.cell_id``,
  ``hpsweep.seed``, ``hpsweep.params`` (JSON of the swept values), ``hpsweep.code_version``
  (git sha when available), ``hpsweep.version``, and where it ran (``hpsweep.node_ip``,
  ``hpsweep.node_id``); params = the full resolved trainer config; metrics at the trainer's
  steps.

Exactly once: a cell's run is created once and reused by every later attempt (a retry, a
resume after Ctrl-C or a crash); a cell with a FINISHED run is never started again.

Trials log from the worker that runs them, through :class:`CellTracker`: ``report`` only
appends to a buffer; a background thread sends the buffer with ``log_batch`` (up to 1,000
metrics a request) every second or so, and ``finish`` sends the rest and sets the status
before the trial is reported done. One synchronous HTTP call per metric key on the driver,
as Ray's stock MLflowLoggerCallback does, is what this replaces.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["default_tracking_uri", "resolve_tracking_uri", "SweepTracker", "CellTracker",
           "code_version", "TAG"]

DEFAULT_DIR = ".hpsweep"
TAG = {
    "role": "hpsweep.role", "sweep": "hpsweep.sweep", "cell": "hpsweep.cell_id",
    "seed": "hpsweep.seed", "params": "hpsweep.params", "code": "hpsweep.code_version",
    "version": "hpsweep.version", "spec_hash": "hpsweep.spec_hash", "node_ip": "hpsweep.node_ip",
    "node_id": "hpsweep.node_id", "attempts": "hpsweep.attempts", "early": "hpsweep.early_stopped",
    "trial": "hpsweep.trial_id",
}
_PARENT = "mlflow.parentRunId"
_BATCH = 1000          # MLflow's log_batch limit on metrics per request
_FLUSH_S = 1.0
_MAX_FAILURES = 10     # consecutive failed flushes (about 10 s) before a trial gives up


def default_tracking_uri() -> str:
    path = Path(DEFAULT_DIR).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def resolve_tracking_uri(flag: str | None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else SQLite under ``.hpsweep/``."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def code_version() -> str:
    """The git sha of the working tree (``+dirty`` when it has changes), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("HPSWEEP_CODE_VERSION", "unknown")


def _client(tracking_uri: str):
    # MLflow prints a "View run" line to stdout each time a run ends: noise in a sweep.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


class SweepTracker:
    """The driver's side: the experiment, the parent run, and which cells are already done."""

    def __init__(self, tracking_uri: str, sweep_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.sweep_name = sweep_name
        self.client = _client(tracking_uri)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None

    def start(self, spec_hash: str, spec_text: str, description: str = "") -> str:
        """Find or create the experiment and the sweep's parent run; return the parent id."""
        from mlflow.entities import RunStatus

        client = self.client
        experiment = client.get_experiment_by_name(self.sweep_name)
        if experiment is None:
            location = None
            if self.tracking_uri.startswith("sqlite:") or self.tracking_uri.startswith("file:"):
                location = (Path(DEFAULT_DIR).resolve() / "artifacts").as_uri()
            self.experiment_id = client.create_experiment(self.sweep_name, artifact_location=location)
        else:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            self.experiment_id = experiment.experiment_id
        parents = client.search_runs(
            [self.experiment_id], f"tags.`{TAG['role']}` = 'sweep'", max_results=1,
            order_by=["attributes.start_time ASC"])
        if parents:
            self.parent_run_id = parents[0].info.run_id
            client.update_run(self.parent_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            run = client.create_run(self.experiment_id, run_name=self.sweep_name, tags={
                TAG["role"]: "sweep", TAG["sweep"]: self.sweep_name})
            self.parent_run_id = run.info.run_id
        client.set_tag(self.parent_run_id, TAG["spec_hash"], spec_hash)
        client.set_tag(self.parent_run_id, TAG["code"], code_version())
        if description:
            client.set_tag(self.parent_run_id, "mlflow.note.content", description)
        client.log_text(self.parent_run_id, spec_text, "sweep.yaml")
        return self.parent_run_id

    def cell_runs(self) -> dict[str, list[Any]]:
        """cell id -> every child run of the sweep for that cell (newest first)."""
        runs: dict[str, list[Any]] = {}
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], f"tags.`{TAG['role']}` = 'cell'", max_results=5000,
                order_by=["attributes.start_time DESC"], page_token=token)
            for run in page:
                runs.setdefault(run.data.tags.get(TAG["cell"], ""), []).append(run)
            token = page.token
            if not token:
                return runs

    def finished_cells(self, runs: dict[str, list[Any]] | None = None) -> set[str]:
        runs = self.cell_runs() if runs is None else runs
        return {cell for cell, rs in runs.items() if any(r.info.status == "FINISHED" for r in rs)}

    def settle(self, cells: list[str], status: str, only_from: tuple[str, ...] = ("RUNNING",)) -> int:
        """Set the runs of ``cells`` that are in ``only_from`` states to ``status``
        (e.g. RUNNING -> KILLED after an interruption); return how many changed."""
        wanted = set(cells)
        changed = 0
        for cell, rs in self.cell_runs().items():
            if cell in wanted:
                for run in rs:
                    if run.info.status in only_from:
                        self.client.set_terminated(run.info.run_id, status=status)
                        changed += 1
        return changed

    def finish(self, status: str) -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)


class CellTracker:
    """The worker's side: one cell's run, reused across attempts; metrics and checkpoints
    sent from a background thread so that the trainer never waits on the network.

    Checkpoints ride with the metrics: a checkpoint is queued only with the report that
    follows it, and the thread sends the metrics before it writes the checkpoint, so a
    checkpoint in storage never runs ahead of the metrics in MLflow (a resumed cell leaves
    no gap in its history).
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep_name: str,
                 cell: Any, extra_tags: dict[str, str] | None = None, write_checkpoint=None) -> None:
        self.client = _client(tracking_uri)
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
        self._opened = threading.Event()
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
        existing = self.client.search_runs(
            [experiment_id], f"tags.`{TAG['cell']}` = '{cell.id}' and tags.`{_PARENT}` = '{parent_run_id}'",
            order_by=["attributes.start_time DESC"])
        if any(r.info.status == "FINISHED" for r in existing):
            raise RuntimeError(f"cell {cell.id} already has a finished run; refusing to run it twice")
        if existing:
            run_id = existing[0].info.run_id
            attempts = int(existing[0].data.tags.get(TAG["attempts"], "1")) + 1
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            tags = [RunTag(TAG["attempts"], str(attempts))]
            tags += [RunTag(k, v) for k, v in extra_tags.items()]
            self.client.log_batch(run_id, tags=tags)
            return run_id
        tags = {
            _PARENT: parent_run_id, TAG["role"]: "cell", TAG["sweep"]: sweep_name,
            TAG["cell"]: cell.id, TAG["seed"]: str(cell.seed),
            TAG["params"]: json.dumps(cell.params, sort_keys=False),
            TAG["code"]: os.environ.get("HPSWEEP_CODE_VERSION", "unknown"),
            TAG["version"]: hpsweep.__version__, TAG["attempts"]: "1", **extra_tags,
        }
        run = self.client.create_run(experiment_id, run_name=f"{cell.label()}"[:250], tags=tags)
        # The params go out with the first metrics (one request fewer a trial).
        self._params = [Param(k, _param_text(v)) for k, v in cell.config.items()]
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
            with self._lock:
                rows, self._buffer = self._buffer, []
                checkpoint, self._checkpoint = self._checkpoint, None
            sent = 0  # rows[:sent] are in MLflow
            try:
                while self._params:  # the params ride with the first metrics, 100 a request
                    chunk = rows[sent:sent + _BATCH - 100]
                    self.client.log_batch(self.run_id, metrics=chunk, params=self._params[:100])
                    self._params = self._params[100:]
                    sent += len(chunk)
                while sent < len(rows):
                    chunk = rows[sent:sent + _BATCH]
                    self.client.log_batch(self.run_id, metrics=chunk)
                    sent += len(chunk)
                if checkpoint is not None and self._write_checkpoint is not None:
                    self._write_checkpoint(checkpoint)
                    checkpoint = None
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

    def close(self, keep_checkpoint: bool = True) -> None:
        """Stop the background thread and send what is buffered; the status is left as is."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=60)
        if not keep_checkpoint:
            with self._lock:
                self._checkpoint = None
        for attempt in range(_MAX_FAILURES):
            try:
                self.flush()
                break
            except Exception:
                if attempt == _MAX_FAILURES - 1:
                    raise
                time.sleep(min(0.1 * 2 ** attempt, 2.0))

    def finish(self, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
        """Send what is buffered, then set the run's final status (synchronously)."""
        from mlflow.entities import RunTag

        # A finished cell is never resumed: its last checkpoint is moot.
        self.close(keep_checkpoint=status != "FINISHED")
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(self.run_id, status=status)


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]
