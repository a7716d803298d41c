"""Data loaders for the original formats: MNIST IDX files, image folders and PTB-style token files.

Every location goes through ``run.data_path(uri)``, so a local directory and an ``s3://``
prefix work alike, and a relative path resolves where the run says (under the sweep file's
directory or the data root, see :mod:`hpsweep.trainer.data`), never against this checkout.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from hpsweep.trainer.data import default_cache_dir, expand_vars

__all__ = ["resolve_uri", "read_idx", "load_mnist", "IMAGE_SUFFIXES", "scan_image_folder",
           "load_image_folder", "load_images", "Corpus", "load_corpus"]


def resolve_uri(uri: str) -> str:
    """Expand ``${VAR}`` / ``${VAR:-default}`` (the run resolves the rest: ``run.data_path``)."""
    return expand_vars(uri)


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
                         "e.g. data_dir=mnist (under the data root)")
    directory = Path(run.data_path(_dir_uri(resolve_uri(data_dir))))
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx_cached(_find(directory, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx_cached(_find(directory, f"{prefix}-labels-idx1-ubyte"))
        out[f"{split}_x"] = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
        out[f"{split}_y"] = torch.from_numpy(labels.astype(np.int64))
    return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_LAYOUT = "ROOT/train/<class name>/<image files> and ROOT/test/<class name>/<image files>"


def scan_image_folder(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names (sorted: their index is the label) and each split's (file, label) list.

    Files of other suffixes (``.DS_Store``, notes) are ignored; hidden folders too. A missing
    split, no class folders, a class folder without images, or a test class absent from train
    is a ValueError naming the path.
    """
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise ValueError(f"{root}: no {split}/ folder; an image-folder data set has the layout {_LAYOUT}")
    folders = {split: sorted(d for d in (root / split).iterdir() if d.is_dir() and not d.name.startswith("."))
               for split in ("train", "test")}
    for split, dirs in folders.items():
        if not dirs:
            raise ValueError(f"{root / split}: no class folders; expected {_LAYOUT}")
    classes = [d.name for d in folders["train"]]
    label = {name: i for i, name in enumerate(classes)}
    unknown = [d.name for d in folders["test"] if d.name not in label]
    if unknown:
        raise ValueError(f"{root / 'test'}: classes {unknown} have no folder under {root / 'train'}")
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, dirs in folders.items():
        files[split] = []
        for d in dirs:
            images = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise ValueError(f"{d}: no image files (expected {', '.join(IMAGE_SUFFIXES)}) in this class "
                                 f"folder; the layout is {_LAYOUT}")
            files[split].extend((f, label[d.name]) for f in images)
    return classes, files


def _decode(path: Path, size: int | None, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)   # (C, H, W)


def _decode_all(files: list[tuple[Path, int]], size: int | None, channels: int) -> np.ndarray:
    """uint8 (n, C*H*W); Pillow decodes outside the GIL, so threads overlap."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        images = list(pool.map(lambda item: _decode(item[0], size, channels), files, chunksize=64))
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{files[0][0].parents[2]}: images of different sizes {sorted(shapes)[:4]}...: "
                         "set image_size to resize them to one square size")
    return np.stack([im.reshape(-1) for im in images])


_FOLDER_CACHE: dict[str, dict[str, np.ndarray]] = {}


def load_image_folder(root: Path, size: int | None = None, channels: int = 1) -> dict[str, torch.Tensor]:
    """An image folder as :func:`load_mnist` gives MNIST: train_x, train_y, test_x, test_y.

    Images are converted to grayscale (``channels=1``) or RGB (3), resized to ``size`` x
    ``size`` (bilinear; None keeps them as stored, which must then be one size), flattened
    channel-major to float32 in [0, 1]. Labels index the class folder names sorted.

    Decoded uint8 arrays are kept per process and in ``HPSWEEP_DATA_CACHE/image_folder/`` (the
    data cache of hpsweep/trainer/data.py), keyed by the files' names, sizes and mtimes and
    the conversion, so trials and epochs decode once.
    """
    classes, files = scan_image_folder(root)
    digest = hashlib.sha1(repr((str(root.resolve()), size, channels, classes)).encode())
    for split in ("train", "test"):
        for f, y in files[split]:
            stat = f.stat()
            digest.update(f"{f.relative_to(root)}\0{y}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    key = digest.hexdigest()
    if key not in _FOLDER_CACHE:
        cached = default_cache_dir() / "image_folder" / f"{key}.npz"
        if cached.exists():
            with np.load(cached) as npz:
                arrays = {name: npz[name] for name in npz.files}
        else:
            arrays = {}
            for split in ("train", "test"):
                arrays[f"{split}_x"] = _decode_all(files[split], size, channels)
                arrays[f"{split}_y"] = np.array([y for _, y in files[split]], dtype=np.int64)
            if arrays["train_x"].shape[1] != arrays["test_x"].shape[1]:
                raise ValueError(f"{root}: train and test images differ in size: set image_size")
            cached.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=f".{key}.", suffix=".npz")
            os.close(fd)
            try:   # written whole, then renamed: concurrent trials never read half a file
                np.savez(tmp, **arrays)
                os.replace(tmp, cached)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        _FOLDER_CACHE[key] = arrays
    arrays = _FOLDER_CACHE[key]
    out = {}
    for split in ("train", "test"):
        out[f"{split}_x"] = torch.from_numpy(arrays[f"{split}_x"].astype(np.float32) / 255.0)
        out[f"{split}_y"] = torch.from_numpy(arrays[f"{split}_y"].copy())
    return out


def load_images(run, cfg) -> dict[str, torch.Tensor]:
    """The MNIST experiments' data by ``cfg.data_format``: MNIST IDX files or an image folder."""
    if cfg.data_format == "mnist":
        return load_mnist(run, cfg.data_dir)
    if cfg.data_dir is None:
        raise ValueError(f"data_dir is required: an image folder (local or s3:// prefix) with the layout {_LAYOUT}")
    root = Path(run.data_path(_dir_uri(resolve_uri(cfg.data_dir))))
    return load_image_folder(root, cfg.image_size, cfg.image_channels)


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
                         "e.g. data_dir=brown lm_prefix=brown (under the data root)")
    base = resolve_uri(data_dir).rstrip("/")
    texts = {}
    for split in ("train", "valid", "test"):
        path = Path(run.data_path(f"{base}/{prefix}.{split}.txt"))
        texts[split] = path.read_text(encoding="utf-8")
    return Corpus(texts, {"train": train_tokens, "valid": eval_tokens, "test": eval_tokens})
