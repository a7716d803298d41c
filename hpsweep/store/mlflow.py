"""How hpsweep lays a sweep out in MLflow: the one module that knows it.

Layout (every tag name is declared once, in :data:`TAG`):

- experiment = sweep name, tagged ``mlflow.experimentKind=custom_model_development`` so that
  the MLflow UI (3.x) opens it on its runs, not on the GenAI overview; one parent run per sweep
  (tag ``hpsweep.role=sweep``), the sweep YAML logged as its artifact ``sweep.yaml``;
- one child run per cell, tagged ``hpsweep.role=cell``, ``hpsweep.sweep``, ``hpsweep.cell_id``,
  ``hpsweep.seed``, ``hpsweep.params`` (JSON of the swept values), ``hpsweep.code_version``
  (git sha when available), ``hpsweep.version``, and where it ran (``hpsweep.node_ip``,
  ``hpsweep.node_id``, and ``hpsweep.worker_pid``, which names the Ray worker's log files);
  params = the full resolved trainer config; metrics at the trainer's
  steps.

The MLflow client is built in one place (:func:`mlflow_client`).

Writes. Exactly once: a cell's run is created once and reused by every later attempt (a retry,
a resume after Ctrl-C or a crash); a cell with a FINISHED run is never started again. Trials
log from the worker that runs them, through :class:`CellTracker`: ``report`` only appends to a
buffer; a background thread sends the buffer with ``log_batch`` (up to 1,000 metrics a request)
every second or so, and ``finish`` sends the rest and sets the status before the trial is
reported done. One synchronous HTTP call per metric key on the driver, as Ray's stock
MLflowLoggerCallback does, is what this replaces.

Reads (the runs of a sweep back from MLflow, in bulk) are :mod:`hpsweep.store.runs`'s, in this layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "TAG", "EXPERIMENT_KIND", "mlflow_client", "default_tracking_uri", "resolve_tracking_uri",
    "code_version", "experiment_url", "run_url", "log_report", "view_state", "VIEW_TAG", "VIEW_KEY",
    "SweepTracker", "param_text", "PARENT", "BATCH",
]

DEFAULT_DIR = ".hpsweep"
TAG = {
    "role": "hpsweep.role", "sweep": "hpsweep.sweep", "cell": "hpsweep.cell_id",
    "seed": "hpsweep.seed", "params": "hpsweep.params", "code": "hpsweep.code_version",
    "version": "hpsweep.version", "spec_hash": "hpsweep.spec_hash", "node_ip": "hpsweep.node_ip",
    "node_id": "hpsweep.node_id", "attempts": "hpsweep.attempts", "early": "hpsweep.early_stopped",
    "trial": "hpsweep.trial_id", "storage": "hpsweep.storage", "pid": "hpsweep.worker_pid",
    "error": "hpsweep.error",    # a failed cell's reason: its trainer's exception, first line
    # on the sweep's run: the --set overrides of its last driver (JSON list of FIELD=VALUE), and
    # what that driver waits for ("<since epoch s> <message>") while no node can hold a trial
    "overrides": "hpsweep.overrides", "waiting": "hpsweep.waiting",
    # a cell's run per attempt: the run whose history it continues, and (on a deleted
    # predecessor) the run that replaced it (see hpsweep.store.tracker)
    "continues": "hpsweep.continues", "superseded_by": "hpsweep.superseded_by",
    # on the experiment: "<key> <storage uri>", where the finished index of the sweep is
    # (see hpsweep.store.storage), or "mixed" once drivers with another storage ran the sweep
    "index": "hpsweep.finished_index",
}
PARENT = "mlflow.parentRunId"
BATCH = 1000          # MLflow's log_batch limit on metrics per request
#: the experiment tag the MLflow UI (3.x) reads to choose an experiment's landing page; without
#: it a new experiment opens on the GenAI overview (traces), with it on the runs table
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def default_tracking_uri() -> str:
    # made by the first client (_prepare_sqlite), not here: a refused run or a read creates nothing
    return f"sqlite:///{Path(DEFAULT_DIR).resolve() / 'mlflow.db'}"


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
    if path.parent == Path(DEFAULT_DIR).resolve():
        path.parent.mkdir(exist_ok=True)   # the default store's directory is ours to make
    if not path.parent.is_dir():
        return  # not ours to create; MLflow says what is wrong
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    _PREPARED.add(uri)


def code_version(where: str | Path | None = None, module: str | None = None) -> str:
    """The version of a trainer's code: the git commit of its source (``where``, its directory;
    ``+dirty`` when that tree has changes), else the installed distribution ``module`` comes
    from (``mylab 1.2.0``), else ``HPSWEEP_CODE_VERSION``, else ``unknown``. hpsweep's own
    version is tagged beside it (``hpsweep.version``)."""
    cwd = str(where) if where is not None else None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True, cwd=cwd).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, cwd=cwd).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if module:
        from importlib import metadata

        dists = metadata.packages_distributions().get(module.split(".")[0], [])
        if dists:
            return f"{dists[0]} {metadata.version(dists[0])}"
    return os.environ.get("HPSWEEP_CODE_VERSION", "unknown")


def mlflow_client(tracking_uri: str | None):
    """The MLflow client for ``tracking_uri`` (built here only)."""
    # MLflow prints a "View run" line to stdout each time a run ends: noise in a sweep.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow.tracking import MlflowClient

    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        _prepare_sqlite(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


#: the MLflow UI's saved views (3.x): an experiment tag ``mlflow.sharedViewState.<key>`` holds a
#: view's search facets and table state as JSON, and ``?viewStateShareKey=<key>`` opens it (only
#: when the address carries no other search facet: ``orderByKey`` there would override it)
VIEW_TAG, VIEW_KEY = "mlflow.sharedViewState.", "hpsweep-cells"


def view_state(swept: Sequence[str], metric: str, mode: str) -> dict[str, Any]:
    """The MLflow UI's view of a sweep's cells: the cell runs only (the sweep's parent run
    filtered out), best first by ``metric``, with the swept parameters, the seed and the
    metric as the visible columns (keys as the UI writes them: ``params.`lr```)."""
    columns = [f"metrics.`{metric}`", *(f"params.`{p}`" for p in dict.fromkeys([*swept, "seed"]))]
    return {
        "searchFilter": f"tags.`{TAG['role']}` = 'cell'",
        "orderByKey": f"metrics.`{metric}`", "orderByAsc": mode == "min",
        "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": columns, "columnOrder": columns, "runsHiddenMode": "SHOW_ALL",
        "viewMaximized": False, "runListHidden": False,
    }


def experiment_url(tracking_ui: str, experiment_id: str | None, metric: str | None = None,
                   mode: str = "min", view: bool = True) -> str:
    """The MLflow UI page of a sweep's cells: the experiment's runs table (route
    ``/experiments/:experimentId/runs`` of the 3.x UI) on the model-training side
    (``workflowType=machine_learning``), in the saved view :meth:`SweepTracker.set_view`
    writes (``view``); without it, sorted by ``metric``, best first (sorted by anything but
    the start time, the UI lists the cells flat, not collapsed under the sweep's parent run)."""
    url = f"{tracking_ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if view:
        return url + f"&viewStateShareKey={VIEW_KEY}"
    if metric:
        key = urllib.parse.quote(f"metrics.`{metric}`", safe="")
        url += f"&orderByKey={key}&orderByAsc={'true' if mode == 'min' else 'false'}"
    return url


def run_url(tracking_ui: str, experiment_id: str | None, run_id: str) -> str:
    """The MLflow UI page of one run."""
    return f"{tracking_ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def log_report(tracking_uri: str, parent_run_id: str, files: Sequence[Path],
               figures: Sequence[Path]) -> None:
    """Log a report's files as artifacts of the sweep's parent run (``report/``).

    A run whose artifacts are a local directory (the default store's ``.hpsweep/artifacts``)
    gets the files copied there, as MLflow's local artifact repository does, without importing
    MLflow's client (which took 1.5 to 4.6 s of a 12-cell sweep's report)."""
    from hpsweep.store.readers import reader_for

    reader = reader_for(tracking_uri)
    where = reader.artifact_uri(parent_run_id) if hasattr(reader, "artifact_uri") else None
    if where and where.startswith("file://"):
        import shutil
        import urllib.request

        root = Path(urllib.request.url2pathname(urllib.parse.urlsplit(where).path))
        for sub, paths in (("report", files), ("report/figures", figures)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            for p in paths:
                shutil.copyfile(p, root / sub / Path(p).name)
        return
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
              storage_uri: str | None = None, overrides: Sequence[str] = (),
              code: str | None = None) -> str:
        """Find or create the experiment and the sweep's parent run; return the parent id.
        ``code``: the trainer's code version (:func:`code_version`).
        ``storage_uri`` (where the cells' checkpoints and leases live) is tagged on the parent,
        so that ``hpsweep status`` reads the right leases without being told; ``overrides``
        (the driver's ``--set FIELD=VALUE``) are tagged there too, and kept with the file as
        ``overrides.json``."""
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
        client.set_tag(self.parent_run_id, TAG["code"], code or code_version())
        if storage_uri:
            client.set_tag(self.parent_run_id, TAG["storage"], storage_uri)
        if description:
            client.set_tag(self.parent_run_id, "mlflow.note.content", description)
        client.log_text(self.parent_run_id, spec_text, "sweep.yaml")
        client.set_tag(self.parent_run_id, TAG["overrides"], json.dumps(list(overrides)))
        client.log_text(self.parent_run_id, json.dumps(list(overrides), indent=1), "overrides.json")
        return self.parent_run_id

    def set_waiting(self, message: str | None, since: float) -> None:
        """Tag the sweep's run with what its driver waits for (``hpsweep status`` shows it), or
        clear it (``message`` None)."""
        self.client.set_tag(self.parent_run_id, TAG["waiting"], f"{since:.0f} {message}" if message else "")

    def set_view(self, swept: Sequence[str], metric: str, mode: str) -> None:
        """Save the MLflow UI's view of the sweep's cells on its experiment (see :func:`view_state`)."""
        self.client.set_experiment_tag(self.experiment_id, VIEW_TAG + VIEW_KEY,
                                       json.dumps(view_state(swept, metric, mode)))

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
            [self.experiment_id], f"tags.`{TAG['cell']}` = '{cell_id}' and tags.`{PARENT}` = "
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
            PARENT: self.parent_run_id, TAG["role"]: "cell", TAG["sweep"]: self.sweep_name,
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
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + BATCH])
        self.client.set_terminated(run_id, status="FINISHED")
        return True

    def finish(self, status: str) -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)


def param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]
