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

from trainers.mbpa.adapt import (  # noqa: E402
    adapt_predict,
    adapt_predict_loop,
    adapt_predict_mlp,
    first_step_terms,
    linear_fn,
    mlp_layers,
)
from trainers.mbpa.data import read_idx  # noqa: E402
from trainers.mbpa.lm_adapt import softmax_explicit, softmax_sgd_correction  # noqa: E402
from trainers.mbpa.memory import DEFAULT_NPROBE, EpisodicMemory, kernel_weights, knn  # noqa: E402
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
    """g = the output layer (hidden keys) and g = the whole MLP (pixel keys, the default):
    closed-form batched adaptation (what the trainer runs) and the generic ``vmap(grad)`` path,
    each against the per-query loop, on the same neighbours.

    For T = 1 the batched path back-propagates each distinct neighbour once per batch; an
    evaluation pass over a fixed memory (the trainer's) does it once per memory slot instead,
    so a second row gives queries/s over a 10,000-query pass with that cost included."""
    N, K, B = 5000, 256, 256
    torch.manual_seed(0)
    model = MLP(100)
    with torch.no_grad():
        hidden = model.features(x[:N + B])
    loop_n = 4 if quick else 16
    for what, module, keys in (("output layer (hidden keys)", model.out, hidden),
                               ("whole MLP (pixel keys)", model, x[:N + B])):
        mem, q = keys[:N], keys[N:N + B]
        d2, idx = knn(q, mem, K)
        nb_x, nb_y, w = mem[idx], labels[:N][idx], kernel_weights(d2)
        theta = {n: p.detach() for n, p in module.named_parameters()}
        fn = linear_fn if module is model.out else (lambda p, i: torch.func.functional_call(model, p, (i,)))
        layers = mlp_layers(module)
        for T in (1, 5):
            loop = timed(lambda: adapt_predict_loop(module, nb_x[:loop_n], nb_y[:loop_n], w[:loop_n], q[:loop_n],
                                                    steps=T, lr=0.1), 1)
            fast = timed(lambda: adapt_predict_mlp(layers, nb_x, nb_y, w, q, steps=T, lr=0.1, nb_idx=idx, nb_d2=d2,
                                                   chunk=64), 1 if quick else 3)
            generic = timed(lambda: adapt_predict(fn, theta, nb_x, nb_y, w, q, steps=T, lr=0.1, chunk=64), 1)
            rows.append((f"adapt {what}, T={T}", f"{B / fast:,.0f} q/s", f"{loop_n / loop:,.0f} q/s",
                         (B / fast) / (loop_n / loop), ">= 20x"))
            if T == 1:
                terms = first_step_terms(layers, mem, labels[:N])
                once = timed(lambda: first_step_terms(layers, mem, labels[:N]), 1 if quick else 3)
                per_batch = timed(lambda: adapt_predict_mlp(layers, nb_x, nb_y, w, q, steps=T, lr=0.1, nb_idx=idx,
                                                            nb_d2=d2, terms=terms), 1 if quick else 3)
                pass_qps = 10_000 / (once + 10_000 / B * per_batch)
                rows.append((f"  ... 10k-query eval pass (memory terms {once * 1e3:.0f} ms once)",
                             f"{pass_qps:,.0f} q/s", f"{loop_n / loop:,.0f} q/s", pass_qps / (loop_n / loop), ">= 20x"))
            rows.append(("  ... generic vmap(grad) path", f"{B / generic:,.0f} q/s", f"{loop_n / loop:,.0f} q/s",
                         (B / generic) / (loop_n / loop), ""))


def knn_keys(x: torch.Tensor, N: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, queries) for the kNN rows: N real MNIST training images (past 60,000 the images
    shifted one pixel right: real, distinct digits), 256 queries from the test set; D = 200 is
    a fixed random projection of the same pixels (structured keys of an embedding's size)."""
    keys = x[:N]
    if N > x.shape[0]:
        shifted = torch.roll(x[:N - x.shape[0]].view(-1, 28, 28), 1, dims=2).reshape(-1, 784)
        keys = torch.cat([x, shifted])
    test = read_idx(DATA / "mnist" / "t10k-images-idx3-ubyte.gz")[:256]
    q = torch.from_numpy(test.reshape(len(test), -1).astype("float32") / 255.0)
    if D != 784:
        proj = torch.randn(784, D, generator=torch.Generator().manual_seed(0)) / D ** 0.5
        keys, q = keys @ proj, q @ proj
    return keys.contiguous(), q.contiguous()


def bench_knn(rows: list, quick: bool, x: torch.Tensor) -> None:
    """Exact search (matrix product + top-k) and the IVF (faiss IndexIVFFlat) behind the same
    ``EpisodicMemory.nearest``, side by side on the same keys and queries. The IVF row times
    the search alone (its build, k-means and add, is amortised over an evaluation and printed
    apart) and gives recall@K against the exact neighbours of the same run."""
    B, K = 256, 256
    labels = torch.zeros(100_000, dtype=torch.long)
    for N, D in ((5000, 784), (100_000, 784), (5000, 200), (100_000, 200)):
        keys, q = knn_keys(x, N, D)
        exact = EpisodicMemory(N, D)
        exact.write(keys, labels[:N])
        t = timed(lambda: exact.nearest(q, K), 2 if quick else 4)
        target = "<= 50 ms" if N == 100_000 else ""
        what = "pixels" if D == 784 else "projected pixels"
        rows.append((f"kNN exact N={N:,} D={D} ({what}), B=256 K=256", f"{t * 1e3:.1f} ms", "", None, target))
        if N < 100_000:
            continue
        _, truth = exact.nearest(q, K)
        truth = truth.tolist()
        for nprobe in (DEFAULT_NPROBE,) if quick else sorted({8, DEFAULT_NPROBE, 16}):
            ivf = EpisodicMemory(N, D, index="ivf", nprobe=nprobe)
            ivf.write(keys, labels[:N])
            begin = time.perf_counter()
            ivf.nearest(q, K)                   # builds the index
            build = time.perf_counter() - begin
            t_ivf = timed(lambda: ivf.nearest(q, K), 2 if quick else 4)
            recall = {}
            for k in (K, 32):   # 32: the incremental sweep's K
                found = ivf.nearest(q, k)[1].tolist()
                recall[k] = sum(len(set(f) & set(e[:k])) for f, e in zip(found, truth, strict=True)) / (B * k)
            rows.append((f"  ... IVF nprobe={nprobe} nlist={ivf._ivf.nlist} (build {build:.1f} s)",
                         f"{t_ivf * 1e3:.1f} ms", f"recall {recall[K]:.3f} ({recall[32]:.3f}@32)", t / t_ivf,
                         target if nprobe == DEFAULT_NPROBE else ""))


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
    rows_of = torch.arange(N + B)                     # candidate c's softmax is table row c
    kept = timed(lambda: softmax_sgd_correction(W, b, q, None, nb_y, w, steps=1, lr=0.15, nb_idx=idx,
                                                cand_h=cand_h, probs_table=(table, rows_of), nb_d2=d2),
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
