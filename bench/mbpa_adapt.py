"""MbPA on CPU, side by side in one run: batched local adaptation against a per-query loop,
kNN search time, and language-model evaluation throughput (neighbour-only correction against
explicit per-query adaptation).

    .venv/bin/python bench/mbpa_adapt.py [--quick] [--threads N]

Targets (issue 5): batched >= 20x the loop (T = 1 and 5, K = 256, N = 5,000, batch 256);
kNN over 100,000 keys for a batch of 256 <= 50 ms. Memory keys are real MNIST images, or their
MLP hidden layer; the loop baseline is :func:`trainers.mbpa.adapt.adapt_predict_loop` (autograd
and ``torch.optim`` on a copy per query), timed on a subset of the batch (queries/s).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.mbpa.adapt import adapt_predict, adapt_predict_loop, linear_fn  # noqa: E402
from trainers.mbpa.data import read_idx  # noqa: E402
from trainers.mbpa.lm_adapt import softmax_explicit, softmax_sgd_correction  # noqa: E402
from trainers.mbpa.memory import EpisodicMemory, kernel_weights, knn  # noqa: E402
from trainers.mbpa.models import MLP  # noqa: E402

DATA = Path(os.environ.get("HPSWEEP_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def timed(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` calls after one warm-up (the machine may be shared)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def mnist_pixels(n: int) -> torch.Tensor:
    images = read_idx(DATA / "mnist" / "train-images-idx3-ubyte.gz")[:n]
    return torch.from_numpy(images.reshape(len(images), -1).astype("float32") / 255.0)


def bench_adaptation(rows: list, quick: bool, x: torch.Tensor, labels: torch.Tensor) -> None:
    N, K, B = 5000, 256, 256
    torch.manual_seed(0)
    model = MLP(100)
    memory_pix, memory_hid = EpisodicMemory(N, 784), EpisodicMemory(N, 100)
    memory_pix.write(x[:N], labels[:N])
    with torch.no_grad():
        memory_hid.write(model.features(x[:N]), labels[:N])
    queries = x[N:N + B]
    loop_n = 4 if quick else 16
    for what, memory, fn, theta, module, q in (
        ("output layer (hidden keys)", memory_hid, linear_fn,
         {n: p.detach() for n, p in model.out.named_parameters()}, model.out, model.features(queries).detach()),
        ("whole MLP (pixel keys)", memory_pix, lambda p, i: torch.func.functional_call(model, p, (i,)),
         {n: p.detach() for n, p in model.named_parameters()}, model, queries),
    ):
        d2, nb_x, nb_y = memory.search(q, K)
        w = kernel_weights(d2)
        for T in (1, 5):
            batched = timed(lambda: adapt_predict(fn, theta, nb_x, nb_y, w, q, steps=T, lr=0.1, chunk=B), 1 if quick else 2)
            loop = timed(lambda: adapt_predict_loop(module, nb_x[:loop_n], nb_y[:loop_n], w[:loop_n], q[:loop_n],
                                                    steps=T, lr=0.1), 1)
            rows.append((f"adapt {what}, T={T}", f"{B / batched:,.0f} q/s", f"{loop_n / loop:,.0f} q/s",
                         (B / batched) / (loop_n / loop), ">= 20x"))


def bench_knn(rows: list, quick: bool, x: torch.Tensor) -> None:
    B, K = 256, 256
    for N, D, label in ((5000, 784, "pixels"), (100_000, 784, "pixels"), (5000, 200, "LSTM state"),
                        (100_000, 200, "LSTM state")):
        if D == 784:
            keys = x[:N] if N <= x.shape[0] else torch.cat([x] * (N // x.shape[0] + 1))[:N]
            keys = keys + 0.01 * torch.randn_like(keys)   # distinct keys where the images repeat
            q = x[-B:]
        else:
            keys, q = torch.randn(N, D), torch.randn(B, D)
        sq = (keys * keys).sum(1)
        t = timed(lambda: knn(q, keys, K, key_sqnorms=sq), 2 if quick else 4)
        target = "<= 50 ms" if N == 100_000 else ""
        rows.append((f"kNN N={N:,} D={D} ({label}), B=256 K=256", f"{t * 1e3:.1f} ms", "", None, target))


def bench_lm(rows: list, quick: bool) -> None:
    """Softmax of a 10k vocabulary, K = 256, T = 1: tokens/s of the MbPA component alone."""
    V, H, K, N = 10_000, 200, 256, 5000
    B = 128                             # one evaluation chunk of consecutive positions
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(V, H, generator=g) * 0.05, torch.zeros(V)
    cand_h, cand_y = torch.randn(N + B, H, generator=g), torch.randint(V, (N + B,), generator=g)
    q = cand_h[N:]
    d2, idx = knn(q, cand_h[:N], K)
    w = kernel_weights(d2)
    nb_h, nb_y = cand_h[idx], cand_y[idx]
    fast = timed(lambda: softmax_sgd_correction(W, b, q, nb_h, nb_y, w, steps=1, lr=0.15, nb_idx=idx,
                                                cand_h=cand_h), 1 if quick else 3)
    table = torch.softmax(cand_h @ W.T + b, dim=-1)   # what evaluation keeps beside the memory
    kept = timed(lambda: softmax_sgd_correction(W, b, q, nb_h, nb_y, w, steps=1, lr=0.15, nb_idx=idx,
                                                cand_h=cand_h, probs_of=lambda used: table[used]),
                 1 if quick else 3)
    n_exp = 8 if quick else 16
    explicit = timed(lambda: softmax_explicit(W, b, q[:n_exp], nb_h[:n_exp], nb_y[:n_exp], w[:n_exp], steps=1,
                                              lr=0.15, chunk=8), 1)
    rows.append(("LM MbPA, V=10k K=256 T=1: correction vs explicit", f"{B / fast:,.0f} tok/s",
                 f"{n_exp / explicit:,.0f} tok/s", (B / fast) / (n_exp / explicit), ""))
    rows.append(("  ... correction with kept softmaxes (as in eval)", f"{B / kept:,.0f} tok/s",
                 f"{n_exp / explicit:,.0f} tok/s", (B / kept) / (n_exp / explicit), ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller loop baselines")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = mnist_pixels(60000)
    labels = torch.from_numpy(read_idx(DATA / "mnist" / "train-labels-idx1-ubyte.gz")[:60000].astype("int64"))
    rows: list = []
    start = time.time()
    bench_adaptation(rows, args.quick, x, labels)
    bench_knn(rows, args.quick, x)
    bench_lm(rows, args.quick)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nMbPA on CPU: torch {torch.__version__}, {args.threads} threads, load average {load:.1f}, "
          f"{time.time() - start:.0f} s\n")
    print(f"{'case':<52} {'batched / fast':>16} {'loop / explicit':>16} {'ratio':>8}  target")
    for case, a, b_, ratio, target in rows:
        r = f"{ratio:.1f}x" if ratio is not None else ""
        print(f"{case:<52} {a:>16} {b_:>16} {r:>8}  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
