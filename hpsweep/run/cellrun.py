"""The ``run`` a trainer gets inside a trial: the Run protocol of :mod:`hpsweep.trainer.run`,
backed by the cell's tracker (MLflow), the sweep's storage (checkpoints, outputs) and the trial's
reports to Tune."""

from __future__ import annotations

import time

from hpsweep.spec.plan import Cell
from hpsweep.store.leases import HeldLease
from hpsweep.store.storage import Storage
from hpsweep.store.tracker import CellTracker
from hpsweep.trainer.run import default_device

__all__ = ["TrialRun", "CELL", "RUN_AGE"]

#: the result key naming the cell a result is about
CELL = "hpsweep/cell"
#: seconds since the start of the cell's MLflow run, when the result was made: the live lines
#: time a cell from its run's start (not the trial's, nor the driver's first sight of it), with
#: no clock shared between worker and driver needed
RUN_AGE = "hpsweep/run_age_s"


class TrialRun:
    """The trainer's ``run`` inside a trial: MLflow through the cell's tracker, checkpoints in
    the sweep's storage under the cell id, outputs in the storage's ``outputs/`` (logged as
    artifacts too), progress to Tune."""

    def __init__(self, cell: Cell, storage: Storage, sweep: str, tracker: CellTracker,
                 every: int, gpu: bool, metric: str, bases: list[str] | None = None, tell=None, cpus=1) -> None:
        self.cell, self.storage, self.sweep, self.tracker = cell, storage, sweep, tracker
        self.tell = tell or (lambda result: None)  # a bundle's _Teller, or Tune's report
        self.bases = bases or []   # where relative data paths resolve: the sweep's dir, the data root
        self.every = every
        self.gpu, self.cpus, self._device = gpu, cpus, None   # given a GPU; CPUs: torch's threads
        self.metric = metric
        self._latest: dict[str, float] = {}
        self._saves = 0
        self._held: bytes | None = None
        self.lease: HeldLease | None = None   # the cell's lease (see _hold_cell)
        self.resume: tuple[bytes, dict] | None = None   # the checkpoint to resume from, read

    @property
    def device(self):   # cuda when the trial was given a GPU, else cpu: torch imported on first use
        if self._device is None:
            self._device = default_device(self.gpu, self.cpus)
        return self._device

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
        self.tell({**self._latest, **values, "step": int(step), CELL: self.cell.id,
                   RUN_AGE: round(time.time() - self.tracker.start_ms / 1000, 3)})

    def save_checkpoint(self, state: dict) -> None:
        from hpsweep.trainer.checkpoint import dump_state

        self._saves += 1
        if self._saves % self.every == 0:
            self._held = dump_state(state)  # serialised now: the trainer goes on mutating state

    def load_checkpoint(self) -> dict | None:
        """The state to resume from (as the cell's lease pointed when this attempt took it);
        the run then continues the history of the attempt that saved it, up to its step."""
        from hpsweep.trainer.checkpoint import PLAIN, load_state

        if self.resume is None:
            return None
        data, pointer = self.resume
        self.tracker.continue_from(pointer["run_id"], pointer["step"])
        return load_state(data, None if data.startswith(PLAIN) else self.device)  # torch for tensors only

    def log_artifact(self, path: str) -> None:
        self.tracker.log_artifact(path)

    def data_path(self, uri: str):
        from pathlib import Path

        from hpsweep.trainer.data import default_cache_dir, fetch, locate, output_name

        name = output_name(uri)
        if name is None:
            return fetch(locate(uri, [Path(b) for b in self.bases]))
        path = self.storage.get_path(default_cache_dir() / "outputs", "outputs", *name.split("/"))
        if path is None:
            raise FileNotFoundError(f"{uri!r}: no output {name!r} in {self.storage.uri}/outputs "
                                    "(run the sweep that writes it first, on the same --storage)")
        return path

    def output(self, name: str):
        from hpsweep.trainer.run import staged_output

        def store(path) -> None:
            self.storage.put_path(path, "outputs", *name.strip("/").split("/"))
            if path.is_dir():
                self.tracker.client.log_artifacts(self.tracker.run_id, str(path), artifact_path=path.name)
            else:
                self.tracker.log_artifact(str(path))

        return staged_output(name, store)
