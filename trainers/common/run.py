"""The small interface a trainer reports through, and a local implementation of it.

A trainer calls ``run.report(step, **metrics)`` for its metrics and
``run.save_checkpoint(state)`` whenever its state is consistent (typically right before a
report). Where the checkpoint goes, and how often it is actually persisted, is the Run's
business: under a sweep the engine's Run persists every ``checkpoint.every`` reports to the
sweep's storage (local directory or S3) keyed by the cell id, so that a cell that died resumes
from it, in the same sweep invocation or a later one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from trainers.common.data import fetch

__all__ = ["Run", "LocalRun", "dump_state", "load_state", "safe_load", "UnsafeCheckpoint"]


@runtime_checkable
class Run(Protocol):
    device: torch.device

    def report(self, step: int, **metrics: float) -> None: ...
    def save_checkpoint(self, state: dict) -> None: ...
    def load_checkpoint(self) -> dict | None: ...
    def log_artifact(self, path: str) -> None: ...
    def data_path(self, uri: str) -> Path: ...


def dump_state(state: dict) -> bytes:
    """Serialise a checkpoint (tensors, numbers, nested dicts, RNG states) to bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class UnsafeCheckpoint(ValueError):
    """A checkpoint holding more than tensors and plain containers: refused, never unpickled."""


def safe_load(source, device: torch.device | str | None = None, what: str = "checkpoint"):
    """``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only,
    so that a pickle placed where a checkpoint is expected cannot run code. Every checkpoint
    and model file the project reads goes through here."""
    import pickle

    try:
        return torch.load(source, map_location=device or "cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpoint(f"{what}: refused to load: it holds objects other than tensors and "
                               f"plain containers (loaded with weights_only=True): {first}") from None


def load_state(data: bytes, device: torch.device | None = None) -> dict:
    """Inverse of :func:`dump_state`; tensors land on ``device`` (CPU by default)."""
    return safe_load(io.BytesIO(data), device)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LocalRun:
    """A Run for standalone use: metrics as JSON lines, checkpoint and artifacts in a directory.

    ``out_dir/metrics.jsonl`` gets one ``{"step": ..., "time": ..., name: value, ...}`` line a
    report; ``out_dir/checkpoint.pt`` the latest checkpoint (written atomically);
    ``out_dir/artifacts/`` copies of logged files.
    """

    def __init__(self, out_dir: str | Path, device: torch.device | None = None,
                 data_cache: str | Path | None = None, echo: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = device or default_device()
        self.data_cache = Path(data_cache) if data_cache else None
        self.echo = echo
        self.history: list[dict[str, float]] = []
        self._metrics = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")

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
        shutil.copy2(path, target / Path(path).name)

    def data_path(self, uri: str) -> Path:
        return fetch(uri, self.data_cache)

    def close(self) -> None:
        self._metrics.close()
