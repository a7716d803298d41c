"""Data loaders for the original formats: MNIST IDX files and PTB-style token files.

Every location goes through ``run.data_path(uri)``, so a local directory and an ``s3://``
prefix work alike. A relative local path that does not exist from the current directory is
tried against the project root too: Ray may run a trial in its own working directory, while
sweep files name data relative to the checkout (``../shared/data/mnist``).
"""

from __future__ import annotations

import gzip
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

__all__ = ["PROJECT_ROOT", "resolve_uri", "read_idx", "load_mnist", "Corpus", "load_corpus"]

PROJECT_ROOT = Path(__file__).resolve().parents[2]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def resolve_uri(uri: str) -> str:
    """Expand ``${VAR}`` / ``${VAR:-default}`` and ``~``; anchor a missing relative path at the project root."""
    def sub(match: re.Match) -> str:
        value = os.environ.get(match.group(1))
        if value:
            return value
        if match.group(2) is not None:
            return match.group(2)
        raise ValueError(f"{uri!r}: environment variable {match.group(1)} is not set")

    uri = _VAR.sub(sub, uri)
    if uri.startswith("s3://") or uri.startswith("file://"):
        return uri
    path = Path(uri).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path
    return str(path)


def _dir_uri(uri: str) -> str:
    """An s3:// directory must end with '/' for run.data_path to fetch the prefix."""
    return uri if not uri.startswith("s3://") or uri.endswith("/") else uri + "/"


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or not): unsigned-byte data of any rank."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"{directory}: no {stem}[.gz] (expected the original MNIST IDX files)")


_IDX_CACHE: dict[tuple[str, int, int], np.ndarray] = {}


def _read_idx_cached(path: Path) -> np.ndarray:
    """:func:`read_idx`, remembered per (path, size, mtime): runs in one process share a decode."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _IDX_CACHE:
        _IDX_CACHE[key] = read_idx(path)
    return _IDX_CACHE[key]


def load_mnist(run, data_dir: str | None) -> dict[str, torch.Tensor]:
    """MNIST as float images in [0, 1] flattened to 784 and int64 labels: train_x, train_y, test_x, test_y."""
    if data_dir is None:
        raise ValueError("data_dir is required: a directory (or s3:// prefix) holding the MNIST IDX files, "
                         "e.g. data_dir=../shared/data/mnist")
    directory = Path(run.data_path(_dir_uri(resolve_uri(data_dir))))
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx_cached(_find(directory, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx_cached(_find(directory, f"{prefix}-labels-idx1-ubyte"))
        out[f"{split}_x"] = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
        out[f"{split}_y"] = torch.from_numpy(labels.astype(np.int64))
    return out


class Corpus:
    """Word ids of the train/valid/test files; the vocabulary comes from train (plus <eos>)."""

    def __init__(self, texts: dict[str, str], max_tokens: dict[str, int | None] | None = None) -> None:
        self.words: list[str] = []
        self.index: dict[str, int] = {}
        max_tokens = max_tokens or {}
        for word in self._tokens(texts["train"]):
            if word not in self.index:
                self.index[word] = len(self.words)
                self.words.append(word)
        self.ids = {}
        for split, text in texts.items():
            tokens = self._tokens(text)
            limit = max_tokens.get(split)
            if limit is not None:
                tokens = tokens[:limit]
            unknown = self.index.get("<unk>")
            ids = []
            for word in tokens:
                if word in self.index:
                    ids.append(self.index[word])
                elif unknown is not None:
                    ids.append(unknown)
                else:
                    raise ValueError(f"{split}: word {word!r} is not in the training vocabulary and there is no <unk>")
            self.ids[split] = torch.tensor(ids, dtype=torch.long)

    @staticmethod
    def _tokens(text: str) -> list[str]:
        tokens: list[str] = []
        for line in text.splitlines():
            words = line.split()
            if words:
                tokens.extend(words + ["<eos>"])
        return tokens

    @property
    def vocab_size(self) -> int:
        return len(self.words)


def load_corpus(run, data_dir: str | None, prefix: str, train_tokens: int | None = None,
                eval_tokens: int | None = None) -> Corpus:
    """PTB-format files ``{data_dir}/{prefix}.{train,valid,test}.txt`` (local or s3://).

    The vocabulary is always built from the whole training file (so a model trained on a
    prefix still has the full vocabulary); ``train_tokens`` / ``eval_tokens`` cut the streams.
    """
    if data_dir is None:
        raise ValueError("data_dir is required for experiment=lm: a directory (or s3:// prefix) holding "
                         "PTB-format files PREFIX.train.txt, PREFIX.valid.txt, PREFIX.test.txt, "
                         "e.g. data_dir=../shared/data/brown lm_prefix=brown")
    base = resolve_uri(data_dir).rstrip("/")
    texts = {}
    for split in ("train", "valid", "test"):
        path = Path(run.data_path(f"{base}/{prefix}.{split}.txt"))
        texts[split] = path.read_text(encoding="utf-8")
    return Corpus(texts, {"train": train_tokens, "valid": eval_tokens, "test": eval_tokens})
