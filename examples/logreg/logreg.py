"""Softmax regression on MNIST with NumPy: a trainer of your own, swept by hpsweep.

No import from hpsweep: ``run`` is whatever runs it (a sweep's trial, or ``python -m
hpsweep.trainer ./logreg.py``). Data: ``data_dir`` holds MNIST's four IDX files (``.gz``); a
relative ``data_dir`` is found beside the sweep file, then under ``HPSWEEP_DATA_ROOT``.
"""

import dataclasses
import gzip
import os

METRICS = ("train/loss", "valid/acc", "test/acc")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    lr: float = 0.5
    l2: float = 1e-4
    epochs: int = 5
    batch: int = 100
    train_size: int = 10000      # the first N training images (the rest: 5000 for validation)
    data_dir: str = "mnist"

    def __post_init__(self):
        if not 0 < self.train_size <= 55000:
            raise ValueError(f"train_size must be in 1..55000, got train_size={self.train_size}")


def _idx(path):
    import numpy as np

    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _load(root):
    images = _idx(os.path.join(root, "train-images-idx3-ubyte.gz")).reshape(-1, 784) / 255.0
    labels = _idx(os.path.join(root, "train-labels-idx1-ubyte.gz")).astype(int)
    test_x = _idx(os.path.join(root, "t10k-images-idx3-ubyte.gz")).reshape(-1, 784) / 255.0
    test_y = _idx(os.path.join(root, "t10k-labels-idx1-ubyte.gz")).astype(int)
    return images[:55000], labels[:55000], images[55000:], labels[55000:], test_x, test_y


def _accuracy(w, b, x, y):
    return float(((x @ w + b).argmax(axis=1) == y).mean())


def train(config, run):
    import numpy as np

    train_x, train_y, valid_x, valid_y, test_x, test_y = _load(run.data_path(config.data_dir))
    train_x, train_y = train_x[:config.train_size], train_y[:config.train_size]
    rng = np.random.default_rng(config.seed)
    state = run.load_checkpoint() or {"epoch": 0, "w": rng.normal(0, 0.01, (784, 10)).tolist(), "b": [0.0] * 10}
    w, b = np.asarray(state["w"]), np.asarray(state["b"])   # a checkpoint holds plain values
    for epoch in range(state["epoch"], config.epochs):
        order = np.random.default_rng([config.seed, epoch]).permutation(len(train_x))
        losses = []
        for start in range(0, len(order), config.batch):
            idx = order[start:start + config.batch]
            logits = train_x[idx] @ w + b
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            losses.append(-np.log(p[np.arange(len(idx)), train_y[idx]] + 1e-12).mean())
            p[np.arange(len(idx)), train_y[idx]] -= 1
            w -= config.lr * (train_x[idx].T @ p / len(idx) + config.l2 * w)
            b -= config.lr * p.mean(axis=0)
        run.save_checkpoint({"epoch": epoch + 1, "w": w.tolist(), "b": b.tolist()})
        metrics = {"train/loss": float(np.mean(losses)), "valid/acc": _accuracy(w, b, valid_x, valid_y)}
        if epoch + 1 == config.epochs:
            metrics["test/acc"] = _accuracy(w, b, test_x, test_y)
        run.report(epoch + 1, **metrics)
