"""The small interface a trainer reports through, and a local implementation of it.

A trainer calls ``run.report(step, **metrics)`` for its metrics and
``run.save_checkpoint(state)`` whenever its state is consistent (typically right before a
report). Where the checkpoint goes, and how often it is actually persisted, is the Run's
business: under a sweep the engine's Run persists every ``checkpoint.every`` reports to the
sweep's storage (local directory or S3) keyed by the cell id, so that a cell that died resumes
from it, in the same sweep invocation or a later one.

Files the trainer reads and writes go through ``run`` too, so that no trainer needs S3 clients
or the checkout's location:

- ``run.data_path(uri)``: a local path to read. ``uri`` is an absolute path or ``s3://`` URI
  (fetched to a node-local cache), a relative path (under the sweep file's directory or the
  data root, never climbing out: see :mod:`hpsweep.trainer.data`), or ``output:NAME``, a file or
  directory an earlier run wrote with ``run.output(NAME)``.
- ``with run.output(name) as path:`` a local path (not yet there) to write a file or a
  directory at; when the block ends without an error, the run stores it as the output
  ``name`` (under a sweep: ``<storage>/outputs/<name>``, local directory or S3, shared by every
  sweep on that storage, so that a stage-2 sweep reads what stage 1 wrote) and logs it as an
  artifact of the run. ``name`` is a relative name (``models/lstm.pt``), never a path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from hpsweep.trainer.checkpoint import dump_state, load_state
from hpsweep.trainer.data import check_output_name, fetch, locate, output_name, standalone_bases

__all__ = ["Run", "LocalRun", "default_device"]

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Run(Protocol):
    device: torch.device

    def report(self, step: int, **metrics: float) -> None: ...
    def save_checkpoint(self, state: dict) -> None: ...
    def load_checkpoint(self) -> dict | None: ...
    def log_artifact(self, path: str) -> None: ...
    def data_path(self, uri: str) -> Path: ...
    def output(self, name: str) -> contextlib.AbstractContextManager[Path]: ...


@contextlib.contextmanager
def staged_output(name: str, store) -> Iterator[Path]:
    """``run.output``'s common part: a fresh local path named like ``name`` in a temporary
    directory; ``store(path)`` once the block ends without an error; the directory removed."""
    problem = check_output_name(name)
    if problem:
        from hpsweep.trainer.data import PathEscape

        raise PathEscape(f"run.output: {problem}")
    tmp = Path(tempfile.mkdtemp(prefix="hpsweep-output-"))
    path = tmp / Path(name.strip("/")).name
    try:
        yield path
        if not path.exists():
            raise FileNotFoundError(f"run.output({name!r}): nothing was written at {path}")
        store(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_device(gpu: bool = True, cpus: float | None = None) -> torch.device:
    """CUDA when there is a GPU (and ``gpu``), else the CPU; with ``cpus``, torch's threads set to
    them (torch's default is every core). Imports torch: call it only when a device is used."""
    import torch

    if cpus is not None:
        torch.set_num_threads(max(1, int(cpus)))
    return torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")


def torch_threads(cpus: float) -> None:
    """torch's threads set to ``cpus`` when torch is loaded (a trainer that uses it imported it)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(max(1, int(cpus)))


class LocalRun:
    """A Run for standalone use: metrics as JSON lines, checkpoint and artifacts in a directory.

    ``out_dir/metrics.jsonl`` gets one ``{"step": ..., "time": ..., name: value, ...}`` line a
    report; ``out_dir/checkpoint.pt`` the latest checkpoint (written atomically);
    ``out_dir/artifacts/`` copies of logged files; outputs under ``outputs_dir``
    (default ``out_dir/outputs``; give two runs the same one to chain them). Relative data
    locations resolve under ``bases`` (default: the current directory, then the data root).
    """

    def __init__(self, out_dir: str | Path, device: torch.device | None = None,
                 data_cache: str | Path | None = None, echo: bool = False,
                 outputs_dir: str | Path | None = None, bases: list[Path] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._device = device
        self.data_cache = Path(data_cache) if data_cache else None
        self.outputs_dir = Path(outputs_dir) if outputs_dir else self.out_dir / "outputs"
        self.bases = list(bases) if bases is not None else standalone_bases()
        self.echo = echo
        self.history: list[dict[str, float]] = []
        self._metrics = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")

    @property
    def device(self) -> torch.device:
        """Chosen on first use, so that a trainer without torch never imports it."""
        if self._device is None:
            self._device = default_device()
        return self._device

    def report(self, step: int, **metrics: float) -> None:
        row = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self.echo:
            shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            print(f"step {step:>7}  {shown}", flush=True)

    def save_checkpoint(self, state: dict) -> None:
        path = self.out_dir / "checkpoint.pt"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(dump_state(state))
        os.replace(tmp, path)

    def load_checkpoint(self) -> dict | None:
        path = self.out_dir / "checkpoint.pt"
        return load_state(path.read_bytes()) if path.exists() else None

    def log_artifact(self, path: str) -> None:
        target = self.out_dir / "artifacts"
        target.mkdir(exist_ok=True)
        if Path(path).is_dir():
            shutil.copytree(path, target / Path(path).name, dirs_exist_ok=True)
        else:
            shutil.copy2(path, target / Path(path).name)

    def data_path(self, uri: str) -> Path:
        name = output_name(uri)
        if name is None:
            return fetch(locate(uri, self.bases), self.data_cache)
        path = self.outputs_dir / name
        if not path.exists():
            raise FileNotFoundError(f"{uri!r}: no output {name!r} in {self.outputs_dir} (run the "
                                    "stage that writes it first, with the same outputs directory)")
        return path

    def output(self, name: str) -> contextlib.AbstractContextManager[Path]:
        def store(path: Path) -> None:
            target = self.outputs_dir / name.strip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            if path.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(path, tmp)
                if target.exists():
                    shutil.rmtree(target)
            else:
                shutil.copy2(path, tmp)
            os.replace(tmp, target)   # readers never see half a file
            self.log_artifact(str(path))

        return staged_output(name, store)

    def close(self) -> None:
        self._metrics.close()
