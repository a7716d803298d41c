"""The paper's two tasks: the Copy task with a curriculum, and byte-level language modelling.

Both yield ``(inputs (T, B, I) one-hot floats, targets (T, B) class ids, -1 = no loss)``;
random draws come from an explicit ``torch.Generator`` so a checkpoint can carry them.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import math
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["COPY_INPUTS", "ByteCorpus", "Curriculum", "copy_batch", "read_bytes"]

#: copy-task input channels: bit 0, bit 1, delimiter (the recall phase's input is all zeros)
COPY_INPUTS = 3
LN2 = math.log(2.0)


def copy_batch(length: int, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy task (Graves et al., 2016): ``length`` random bits, a delimiter, then their recall.

    ``T = 2 * length + 1``: bits at steps ``0..L-1``, the delimiter at ``L``, then ``L`` blank
    steps whose targets are the bits in order. Loss only on the recall steps.
    """
    bits = torch.randint(0, 2, (length, batch), generator=generator)
    T = 2 * length + 1
    inputs = torch.zeros(T, batch, COPY_INPUTS)
    inputs[:length] = F.one_hot(bits, COPY_INPUTS).float()
    inputs[length, :, 2] = 1.0
    targets = torch.full((T, batch), -1, dtype=torch.long)
    targets[length + 1:] = bits
    return inputs, targets


class Curriculum:
    """Length starts at 1 and grows by one when the recent mean loss is below ``threshold`` bits."""

    def __init__(self, threshold: float, window: int, max_length: int) -> None:
        self.threshold, self.window, self.max_length = threshold, window, max_length
        self.length = 1
        self.recent: list[float] = []

    def update(self, bits_per_char: float) -> bool:
        """Record one training step's loss; returns True when the length grew."""
        self.recent.append(bits_per_char)
        self.recent = self.recent[-self.window:]
        if (len(self.recent) == self.window and sum(self.recent) / self.window < self.threshold
                and self.length < self.max_length):
            self.length += 1
            self.recent = []  # judge the new length on its own losses
            return True
        return False

    def state_dict(self) -> dict:
        return {"length": self.length, "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.length, self.recent = int(state["length"]), list(state["recent"])


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes; ``.bz2`` and ``.gz`` files (by their magic number) are decompressed."""
    stat = Path(path).stat()
    # Trials of a sweep share a worker process: decompress a given file version once.
    return _read_bytes(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _read_bytes(path: str, mtime_ns: int, size: int) -> bytes:
    raw = Path(path).read_bytes()
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    return raw


class ByteCorpus:
    """Raw bytes split into train, valid and test.

    From one file: the last ``2 * valid_fraction`` of the bytes is held out (valid, then
    test). From a directory: its files whose names contain ``train``, ``valid`` and ``test``
    (WikiText-103 raw: ``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw``).
    """

    VOCAB = 256

    def __init__(self, data: bytes | dict[str, bytes], valid_fraction: float = 0.05, min_length: int = 2) -> None:
        if isinstance(data, dict):
            self.splits = {k: torch.frombuffer(bytearray(v), dtype=torch.uint8).long() for k, v in data.items()}
            n = sum(len(v) for v in self.splits.values())
        else:
            tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
            n = len(tokens)
            held = int(n * valid_fraction)
            self.splits = {"train": tokens[: n - 2 * held], "valid": tokens[n - 2 * held: n - held],
                           "test": tokens[n - held:]}
        for name, part in self.splits.items():
            if len(part) < min_length:
                raise ValueError(f"{name} split has {len(part)} bytes, fewer than {min_length}: "
                                 f"the data ({n} bytes) is too small for valid_fraction={valid_fraction}")

    @classmethod
    def load(cls, path: str | Path, valid_fraction: float = 0.05, min_length: int = 2) -> ByteCorpus:
        """A corpus from a text file (``.bz2``/``.gz`` allowed) or a directory of split files."""
        path = Path(path)
        if not path.is_dir():
            return cls(read_bytes(path), valid_fraction, min_length)
        files = {}
        for split in ("train", "valid", "test"):
            found = sorted(p for p in path.iterdir() if p.is_file() and split in p.name)
            if len(found) != 1:
                raise ValueError(f"{path}: expected one file named like *{split}* in the directory, "
                                 f"found {[p.name for p in found]}")
            files[split] = read_bytes(found[0])
        return cls(files, valid_fraction, min_length)

    @staticmethod
    def encode(tokens: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens (T + 1, B)`` -> one-hot inputs ``(T, B, 256)`` and next-byte targets ``(T, B)``."""
        return F.one_hot(tokens[:-1], ByteCorpus.VOCAB).to(dtype), tokens[1:].clone()

    def crops(self, split: str, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``batch`` random crops of ``length + 1`` bytes as ``(length + 1, batch)``."""
        data = self.splits[split]
        if len(data) < length + 1:
            raise ValueError(f"{split} split has {len(data)} bytes, fewer than seq_len + 1 = {length + 1}")
        starts = torch.randint(0, len(data) - length, (batch,), generator=generator)
        return data[starts[None, :] + torch.arange(length + 1)[:, None]]

    def fixed_crops(self, split: str, count: int, length: int) -> torch.Tensor:
        """``count`` crops spread evenly over a split (the same every time): ``(length + 1, count)``."""
        data = self.splits[split]
        if len(data) < length + 1:
            raise ValueError(f"{split} split has {len(data)} bytes, fewer than seq_len + 1 = {length + 1}")
        starts = torch.linspace(0, len(data) - length - 1, count).long()
        return data[starts[None, :] + torch.arange(length + 1)[:, None]]
