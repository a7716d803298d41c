"""How hpsweep lays a sweep out in MLflow: the one module that knows it.

Layout (every tag name is declared once, in :data:`TAG`):

- experiment = sweep name, tagged ``mlflow.experimentKind=custom_model_development`` so that
  the MLflow UI (3.x) opens it on its runs, not on the GenAI overview; one parent run per sweep
  (tag ``hpsweep.role=sweep``), the sweep YAML logged as its artifact ``sweep.yaml``;
- one child run per cell, tagged ``hpsweep.role=cell``, ``hpsweep.sweep``, ``hpsweep.cell_id``,
  ``hpsweep.seed``, ``hpsweep.params`` (JSON of the swept values), ``hpsweep.code_version``
  (git sha when available), ``hpsweep.version``, and where it ran (``hpsweep.node_ip``,
  ``hpsweep.node_id``); params = the full resolved trainer config; metrics at the trainer's
  steps.

The MLflow client is built in one place (:func:`mlflow_client`).

Writes. Exactly once: a cell's run is created once and reused by every later attempt (a retry,
a resume after Ctrl-C or a crash); a cell with a FINISHED run is never started again. Trials
log from the worker that runs them, through :class:`CellTracker`: ``report`` only appends to a
buffer; a background thread sends the buffer with ``log_batch`` (up to 1,000 metrics a request)
every second or so, and ``finish`` sends the rest and sets the status before the trial is
reported done. One synchronous HTTP call per metric key on the driver, as Ray's stock
MLflowLoggerCallback does, is what this replaces.

Reads (the runs of a sweep back from MLflow, in bulk) are :mod:`hpsweep.runs`'s, in this layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "TAG", "EXPERIMENT_KIND", "mlflow_client", "default_tracking_uri", "resolve_tracking_uri",
    "code_version", "experiment_url", "run_url", "log_report",
    "SweepTracker", "CellTracker",
]

DEFAULT_DIR = ".hpsweep"
TAG = {
    "role": "hpsweep.role", "sweep": "hpsweep.sweep", "cell": "hpsweep.cell_id",
    "seed": "hpsweep.seed", "params": "hpsweep.params", "code": "hpsweep.code_version",
    "version": "hpsweep.version", "spec_hash": "hpsweep.spec_hash", "node_ip": "hpsweep.node_ip",
    "node_id": "hpsweep.node_id", "attempts": "hpsweep.attempts", "early": "hpsweep.early_stopped",
    "trial": "hpsweep.trial_id", "storage": "hpsweep.storage",
    # on the experiment: "<key> <storage uri>", where the finished index of the sweep is
    # (see hpsweep.storage), or "mixed" once drivers with another storage ran the sweep
    "index": "hpsweep.finished_index",
}
_PARENT = "mlflow.parentRunId"
#: the experiment tag the MLflow UI (3.x) reads to choose an experiment's landing page; without
#: it a new experiment opens on the GenAI overview (traces), with it on the runs table
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
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


_PREPARED: set[str] = set()


def _prepare_sqlite(uri: str) -> None:
    """Create or migrate a SQLite store under an exclusive lock (``<db>.lock``), once per
    process: two first runs at once would otherwise both run MLflow's migration and break the
    store (both fail, ``_alembic_tmp_*`` tables left behind). The second one in waits, then
    finds the store ready. The store opened here is MLflow's cached one: no cost later. Done
    when the first client is made (after preflight), not when the URI is resolved, so that a
    refused run creates no store."""
    import fcntl

    from mlflow.tracking import MlflowClient

    if uri in _PREPARED:
        return
    path = Path(uri[len("sqlite:///"):])
    if not path.parent.is_dir():
        return  # not ours to create; MLflow says what is wrong
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    _PREPARED.add(uri)


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


def mlflow_client(tracking_uri: str | None):
    """The MLflow client for ``tracking_uri`` (built here only)."""
    # MLflow prints a "View run" line to stdout each time a run ends: noise in a sweep.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow.tracking import MlflowClient

    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        _prepare_sqlite(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_url(tracking_ui: str, experiment_id: str | None, metric: str | None = None,
                   mode: str = "min") -> str:
    """The MLflow UI page of a sweep's runs: the experiment's runs table (route
    ``/experiments/:experimentId/runs`` of the 3.x UI), sorted by ``metric``, best first.

    Sorted by anything but the start time, the UI lists the cells' runs flat, not collapsed
    under the sweep's parent run, so that a person lands on the cells themselves."""
    url = f"{tracking_ui.rstrip('/')}/#/experiments/{experiment_id}/runs"
    if metric:
        key = urllib.parse.quote(f"metrics.`{metric}`", safe="")
        url += f"?orderByKey={key}&orderByAsc={'true' if mode == 'min' else 'false'}"
    return url


def run_url(tracking_ui: str, experiment_id: str | None, run_id: str) -> str:
    """The MLflow UI page of one run."""
    return f"{tracking_ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def log_report(tracking_uri: str, parent_run_id: str, files: Sequence[Path],
               figures: Sequence[Path]) -> None:
    """Log a report's files as artifacts of the sweep's parent run (``report/``)."""
    c = mlflow_client(tracking_uri)
    for p in files:
        c.log_artifact(parent_run_id, str(p), "report")
    for p in figures:
        c.log_artifact(parent_run_id, str(p), "report/figures")


class SweepTracker:
    """The driver's side: the experiment, the parent run, and which cells are already done."""

    def __init__(self, tracking_uri: str, sweep_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.sweep_name = sweep_name
        self.client = mlflow_client(tracking_uri)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.index: str | None = None   # the key of the sweep's finished index, when trusted

    def start(self, spec_hash: str, spec_text: str, description: str = "",
              storage_uri: str | None = None) -> str:
        """Find or create the experiment and the sweep's parent run; return the parent id.
        ``storage_uri`` (where the cells' checkpoints and leases live) is tagged on the parent,
        so that ``hpsweep status`` reads the right leases without being told."""
        from mlflow.entities import RunStatus
        from mlflow.exceptions import MlflowException

        client = self.client
        experiment = client.get_experiment_by_name(self.sweep_name)
        if experiment is None:
            location = None
            if self.tracking_uri.startswith("sqlite:") or self.tracking_uri.startswith("file:"):
                location = (Path(DEFAULT_DIR).resolve() / "artifacts").as_uri()
            key = uuid.uuid4().hex[:16]
            tags = dict([EXPERIMENT_KIND], **({TAG["index"]: f"{key} {storage_uri}"} if storage_uri else {}))
            try:
                self.experiment_id = client.create_experiment(
                    self.sweep_name, artifact_location=location, tags=tags)
                self.index = key if storage_uri else None
            except MlflowException:  # a driver with another storage created it meanwhile
                experiment = client.get_experiment_by_name(self.sweep_name)
                if experiment is None:
                    raise
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            self.experiment_id = experiment.experiment_id
            if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
            self.index = self._index(experiment.tags.get(TAG["index"]), storage_uri)
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
        if storage_uri:
            client.set_tag(self.parent_run_id, TAG["storage"], storage_uri)
        if description:
            client.set_tag(self.parent_run_id, "mlflow.note.content", description)
        client.log_text(self.parent_run_id, spec_text, "sweep.yaml")
        return self.parent_run_id

    def _index(self, tag: str | None, storage_uri: str | None) -> str | None:
        """The finished index this driver writes to: the tagged one if it lives in this
        driver's storage. An experiment from before the index gets one (the driver marks what
        is finished already, see :meth:`mark_finished`); a driver with another storage marks
        the sweep ``mixed`` (its cells' leases and marks are out of sight of the index)."""
        if tag == "mixed" or not storage_uri:
            return None
        if tag is None:
            key = uuid.uuid4().hex[:16]
            self.client.set_experiment_tag(self.experiment_id, TAG["index"], f"{key} {storage_uri}")
            now = self.client.get_experiment(self.experiment_id).tags.get(TAG["index"])
            if now == f"{key} {storage_uri}":
                return key
            tag = now  # another driver tagged it meanwhile: the same storage's or mixed
            if tag is None:
                return None
        key, _, uri = tag.partition(" ")
        if uri == storage_uri:
            return key
        self.client.set_experiment_tag(self.experiment_id, TAG["index"], "mixed")
        return None

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

    def cell_finished(self, cell_id: str) -> bool:
        """Whether cell ``cell_id`` has a FINISHED run in this sweep (one search for that cell,
        not a read of the whole sweep)."""
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.`{TAG['cell']}` = '{cell_id}' and tags.`{_PARENT}` = "
            f"'{self.parent_run_id}' and attributes.status = 'FINISHED'", max_results=1)
        return bool(runs)

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

    def adopt(self, cell: Any, source_run_id: str, source_sweep: str) -> bool:
        """Record in this sweep a cell that another sweep sharing it (same cell id) ran:
        a FINISHED child run with the source run's params and metric histories, tagged with
        where it came from (``hpsweep.copied_from``). False if the source is not FINISHED."""
        from mlflow.entities import Metric, Param

        import hpsweep

        src = self.client.get_run(source_run_id)
        if src.info.status != "FINISHED":
            return False
        tags = {
            _PARENT: self.parent_run_id, TAG["role"]: "cell", TAG["sweep"]: self.sweep_name,
            TAG["cell"]: cell.id, TAG["seed"]: str(cell.seed),
            TAG["params"]: json.dumps(cell.params, sort_keys=False),
            TAG["code"]: src.data.tags.get(TAG["code"], "unknown"), TAG["version"]: hpsweep.__version__,
            TAG["attempts"]: "0", "hpsweep.copied_from": f"{source_sweep}/{source_run_id}",
        }
        run_id = self.client.create_run(self.experiment_id, run_name=cell.label()[:250], tags=tags).info.run_id
        params = [Param(k, v) for k, v in src.data.params.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i:i + 100])
        metrics = [Metric(m.key, m.value, m.timestamp, m.step) for key in src.data.metrics
                   for m in self.client.get_metric_history(source_run_id, key)]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + _BATCH])
        self.client.set_terminated(run_id, status="FINISHED")
        return True

    def finish(self, status: str) -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)


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
            [experiment_id], f"tags.`{TAG['cell']}` = '{cell.id}' and tags.`{_PARENT}` = '{parent_run_id}'",
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
                    chunk = rows[sent:sent + _BATCH - 100]
                    self.client.log_batch(run_id, metrics=chunk, params=self._params[:100])
                    self._params = self._params[100:]
                    sent += len(chunk)
                while sent < len(rows):
                    chunk = rows[sent:sent + _BATCH]
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


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]
