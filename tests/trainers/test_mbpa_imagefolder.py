"""The image-folder loader (ROOT/{train,test}/<class>/<images>) on real MNIST digits written as
PNG files: it gives back the IDX arrays exactly, resizes and converts as asked, rejects bad
layouts clearly, decodes once, and the incremental experiment reports what the MNIST path does."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpsweep.trainer.run import LocalRun
from trainers.mbpa import Config, train
from trainers.mbpa import data as mbpa_data
from trainers.mbpa.data import load_image_folder, read_idx

DATA = Path(os.environ.get("HPSWEEP_SHARED_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
N_TRAIN, N_TEST = 300, 200


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HPSWEEP_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mbpa_data, "_FOLDER_CACHE", {})


def _write_folder(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST's first images as ROOT/split/<digit>/<index>.png; returns the IDX arrays in the
    loader's order (class name, then file name)."""
    expected = {}
    for split, prefix, n in (("train", "train", N_TRAIN), ("test", "t10k", N_TEST)):
        images = read_idx(DATA / "mnist" / f"{prefix}-images-idx3-ubyte.gz")[:n]
        labels = read_idx(DATA / "mnist" / f"{prefix}-labels-idx1-ubyte.gz")[:n]
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
        order = np.lexsort((np.arange(n), labels))
        expected[split] = (images[order], labels[order].astype(np.int64))
    return expected


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "digits"
    return root, _write_folder(root)


def test_png_copy_loads_back_as_the_idx_arrays(folder):
    root, expected = folder
    out = load_image_folder(root)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = expected[split]
        assert out[f"{split}_x"].dtype == torch.float32 and out[f"{split}_x"].shape == (n, 784)
        assert torch.equal(out[f"{split}_x"], torch.from_numpy(images.reshape(n, -1).astype(np.float32) / 255.0))
        assert torch.equal(out[f"{split}_y"], torch.from_numpy(labels))
    assert set(out) == {"train_x", "train_y", "test_x", "test_y"}


def test_resize_and_rgb(folder):
    root, expected = folder
    small = load_image_folder(root, size=14)
    assert small["train_x"].shape == (N_TRAIN, 196) and small["test_x"].shape == (N_TEST, 196)
    first = Image.fromarray(expected["train"][0][0]).resize((14, 14), Image.Resampling.BILINEAR)
    assert torch.equal(small["train_x"][0], torch.from_numpy(np.asarray(first, np.float32).reshape(-1) / 255.0))
    rgb = load_image_folder(root, size=28, channels=3)
    x = rgb["train_x"].view(N_TRAIN, 3, 28, 28)
    grey = torch.from_numpy(expected["train"][0].astype(np.float32) / 255.0)
    assert all(torch.equal(x[:, c], grey) for c in range(3))   # a grey PNG's three channels


def test_class_names_sort_to_labels(tmp_path):
    for split in ("train", "test"):
        for name, value in (("zebra", 10), ("ant", 200), ("mole", 90)):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("L", (4, 4), value).save(tmp_path / split / name / "a.jpg")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    out = load_image_folder(tmp_path)
    assert out["train_y"].tolist() == [0, 1, 2]   # ant, mole, zebra
    assert [round(float(v) * 255) for v in out["train_x"][:, 0]] == [200, 90, 10]


@pytest.mark.parametrize("breakage, message", [
    ("no_test", r"no test/ folder; an image-folder data set has the layout ROOT/train/<class name>"),
    ("no_classes", r"train: no class folders; expected ROOT/train/<class name>/<image files>"),
    ("no_images", r"train/3: no image files \(expected \.png"),
    ("unknown_test_class", r"test: classes \['7x'\] have no folder under"),
])
def test_bad_layouts_name_the_path_and_the_layout(tmp_path, breakage, message):
    root = tmp_path / "bad"
    for split in ("train", "test"):
        for digit in ("3", "5"):
            (root / split / digit).mkdir(parents=True)
            Image.new("L", (28, 28), 9).save(root / split / digit / "0.png")
    if breakage == "no_test":
        for f in (root / "test").rglob("*.png"):
            f.unlink()
        for d in sorted((root / "test").iterdir()):
            d.rmdir()
        (root / "test").rmdir()
    elif breakage == "no_classes":
        for f in (root / "train").rglob("*.png"):
            f.unlink()
        for d in (root / "train").iterdir():
            d.rmdir()
        Image.new("L", (28, 28)).save(root / "train" / "loose.png")   # images but no class folder
    elif breakage == "no_images":
        (root / "train" / "3" / "0.png").rename(root / "train" / "3" / "0.txt")
    else:
        (root / "test" / "5").rename(root / "test" / "7x")
    with pytest.raises(ValueError, match=message) as info:
        load_image_folder(root)
    assert str(root) in str(info.value)


def test_decoded_once_then_cached_on_disk(folder, monkeypatch):
    root, _ = folder
    calls = []
    decode = mbpa_data._decode
    monkeypatch.setattr(mbpa_data, "_decode", lambda *a: calls.append(1) or decode(*a))
    first = load_image_folder(root)
    assert len(calls) == N_TRAIN + N_TEST
    monkeypatch.setattr(mbpa_data, "_FOLDER_CACHE", {})            # a new process: the disk cache
    second = load_image_folder(root)
    assert len(calls) == N_TRAIN + N_TEST and all(torch.equal(first[k], second[k]) for k in first)
    changed = sorted((root / "train" / "0").iterdir())[0]   # train_x[0]
    Image.new("L", (28, 28), 255).save(changed)                      # a changed file is decoded anew
    third = load_image_folder(root)
    assert len(calls) == 2 * (N_TRAIN + N_TEST) and float(third["train_x"][0].min()) == 1.0


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_incremental_on_the_image_folder_reports_what_the_mnist_path_does(folder, tmp_path):
    torch.set_num_threads(1)
    root, expected = folder
    idx_dir = tmp_path / "idx"   # the same images as IDX files, in the folder's order
    idx_dir.mkdir()
    for split, prefix in (("train", "train"), ("test", "t10k")):
        _write_idx(idx_dir / f"{prefix}-images-idx3-ubyte.gz", expected[split][0])
        _write_idx(idx_dir / f"{prefix}-labels-idx1-ubyte.gz", expected[split][1])
    base = dict(experiment="incremental", method="mbpa", train_per_task=100, pretrain_epochs=1,
                incremental_updates=4, eval_every=2, memory_size=500, neighbours=8, steps=1, alpha=0.1, hidden=32)
    history = {}
    for name, extra in (("mnist", dict(data_dir=str(idx_dir))),
                        ("folder", dict(data_dir=str(root), data_format="image_folder", image_size=28))):
        run = LocalRun(tmp_path / f"run-{name}", device=torch.device("cpu"))
        train(Config(**base, **extra), run)
        history[name] = [{k: v for k, v in row.items() if k != "time"} for row in run.history]
    assert [row["step"] for row in history["folder"]] == [0, 2, 4]
    assert set(history["folder"][0]) == {"step", "acc/old", "acc/new", "acc/all"}
    assert history["folder"] == history["mnist"]
    with pytest.raises(ValueError, match="pretrain_classes must be in"):
        train(Config(**base, data_dir=str(root), data_format="image_folder", pretrain_classes=10),
              LocalRun(tmp_path / "run-bad", device=torch.device("cpu")))


def test_config_checks_the_image_options():
    with pytest.raises(ValueError, match="data_format='image_folder' is for experiment=incremental"):
        Config(experiment="permuted_mnist", data_format="image_folder")
    with pytest.raises(ValueError, match="image_size resizes an image folder"):
        Config(experiment="incremental", method="sgd", image_size=32)
    with pytest.raises(ValueError, match="image_channels must be 1 or 3"):
        Config(experiment="incremental", method="sgd", data_format="image_folder", image_channels=2)
