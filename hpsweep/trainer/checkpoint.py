"""Checkpoint bytes: what ``run.save_checkpoint(state)`` stores and ``run.load_checkpoint()`` reads.

A state holds plain containers (dicts, lists, tuples), numbers, strings, bytes and, for trainers
that use PyTorch, tensors. Loading never runs code from the file:

- a state with tensors is written with ``torch.save`` and read with ``torch.load(weights_only=True)``;
- a state without them is written as a pickle of plain values behind a header of its own, and read
  by an unpickler that refuses every global (so no class, function or module can be named).

torch is imported only for a state that holds tensors (or a file ``torch.save`` wrote), so a
trainer that does not use PyTorch never loads it.
"""

from __future__ import annotations

import io
import pickle
import sys
from typing import Any

__all__ = ["dump_state", "load_state", "safe_load", "UnsafeCheckpoint", "CorruptCheckpoint"]

#: the header of a checkpoint written without torch (torch.save writes a zip file: ``PK``)
PLAIN = b"HPSWEEP-STATE-1\n"


class UnsafeCheckpoint(ValueError):
    """A checkpoint holding more than tensors and plain containers: refused, never unpickled."""


class CorruptCheckpoint(ValueError):
    """A checkpoint that is not readable at all (truncated, overwritten, not a checkpoint): unlike
    an unsafe one, nothing in it can be trusted or refused, so its cell may start again."""


class _Refused(pickle.UnpicklingError):
    """A global named in a plain state: the sign of an unsafe file, not of a damaged one."""


def _has_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:   # nothing imported torch: nothing can hold a tensor
        return False
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            return True
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return False


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise _Refused(f"global '{module}.{name}' is not allowed")


def _plain_loads(data: bytes, what: str) -> Any:
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except _Refused as exc:
        raise UnsafeCheckpoint(f"{what}: refused to load: it holds objects other than tensors and "
                               f"plain containers: {exc}") from None
    except Exception as exc:  # truncated or damaged: not a pickle of plain values any more
        raise CorruptCheckpoint(f"{what}: unreadable ({type(exc).__name__}: {exc})") from None


def dump_state(state: dict) -> bytes:
    """Serialise a checkpoint to bytes (see the module docstring for the two formats)."""
    if _has_tensor(state):
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()
    data = pickle.dumps(state, protocol=4)
    _plain_loads(data, "checkpoint state")   # refuse now, not when a resume needs it
    return PLAIN + data


def safe_load(source, device=None, what: str = "checkpoint"):
    """``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only,
    so that a pickle placed where a checkpoint is expected cannot run code. Every torch checkpoint
    and model file the project reads goes through here."""
    import torch

    try:
        return torch.load(source, map_location=device or "cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpoint(f"{what}: refused to load: it holds objects other than tensors and "
                               f"plain containers (loaded with weights_only=True): {first}") from None


def load_state(data: bytes, device=None, what: str = "checkpoint") -> dict:
    """Inverse of :func:`dump_state`; tensors land on ``device`` (CPU by default)."""
    if data.startswith(PLAIN):
        return _plain_loads(data[len(PLAIN):], what)
    if not data.startswith(b"PK\x03\x04"):  # torch.save writes a zip file; this is neither
        raise CorruptCheckpoint(f"{what}: unreadable: neither a torch.save zip file nor a plain "
                                f"state ({len(data)} bytes starting {data[:8]!r})")
    try:
        return safe_load(io.BytesIO(data), device, what)
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # a damaged zip (truncated, a member missing)
        raise CorruptCheckpoint(f"{what}: unreadable ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
