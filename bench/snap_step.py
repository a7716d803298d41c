"""Time per training step of BPTT, SnAp-1, SnAp-2, RTRL and UORO, side by side in one run.

Byte-level LM shapes (one-hot inputs of 256, 256 outputs), batch 16: GRU and LSTM, hidden 128
and 512, dense and 90% sparse. A step is the forward step plus the method's gradient work
(BPTT: a T = 128 window forward and backward, divided by 128); the optimiser's update, once a
window for every method, is left out. Each method's ratio to BPTT on the same network is
printed, on a sparse network also its ratio to BPTT on the dense network of the same cell and
size ("x dense"), and for SnAp-1 its ratio to its memory floor: one read and one write of its
influence (batch x state components x kept parameters, as floats) per step, at the copy
bandwidth this run measures on a buffer far larger than the caches.

    python bench/snap_step.py            # the issue's table (CPU: ~3 minutes)
    python bench/snap_step.py --quick    # hidden 32 and 64, a few seconds
    python bench/snap_step.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.snap.cells import SparseRNN  # noqa: E402
from trainers.snap.gradients import bptt_window  # noqa: E402
from trainers.snap.influence import Online  # noqa: E402

__all__ = ["main"]

VOCAB, BATCH, WINDOW = 256, 16, 128


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes moved per second (read + write) by ``dst.copy_(src)``, best of several."""
    n = megabytes * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t = clock()
        dst.copy_(src)
        sync(device)
        best = min(best, clock() - t)
    return 2 * n * 4 / best


def timed(fn, device: torch.device, min_time: float, max_reps: int, rounds: int = 3) -> float:
    """Seconds per call: a warm-up call, then the best of ``rounds`` rounds of timed calls.

    The best round, not the mean: other processes on a shared machine only ever add time.
    """
    fn()
    sync(device)
    best = float("inf")
    for _ in range(rounds):
        reps, start = 0, clock()
        while True:
            fn()
            reps += 1
            sync(device)
            elapsed = clock() - start
            if elapsed >= min_time / rounds or reps >= max(1, max_reps // rounds):
                break
        best = min(best, elapsed / reps)
    return best


def influence_bytes(model: SparseRNN, method: str) -> int:
    """Bytes an online method's influence would take (to skip what does not fit)."""
    H, c, m = model.hidden, model.components, model.per_unit
    if method == "snap1":
        n = BATCH * H * c * m
    elif method == "rtrl":
        n = BATCH * H * c * H * m
    elif method == "snap2":
        from trainers.snap.influence import reach_rows
        n = BATCH * H * reach_rows(model.recurrent_adjacency(), 2).shape[1] * c * m
    else:
        n = BATCH * H * m
    return 4 * n


def bench_network(cell: str, hidden: int, density: float, methods: list[str], device: torch.device,
                  bandwidth: float, budget: float, min_time: float) -> list[dict]:
    model = SparseRNN(cell, VOCAB, hidden, VOCAB, density=density, seed=0).to(device)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (WINDOW + 1, BATCH), generator=gen)
    x = torch.nn.functional.one_hot(tokens[:-1], VOCAB).float().to(device)
    y = tokens[1:].to(device)
    w = torch.full((WINDOW, BATCH), 1.0 / (WINDOW * BATCH), device=device)
    rows = []
    for method in methods:
        row = {"cell": cell, "hidden": hidden, "sparsity": 1 - density, "method": method}
        rows.append(row)
        if method == "rtrl" and (hidden > 128 or density < 1):
            row["note"] = "rtrl: hidden 128 dense only"
            continue
        if method == "bptt":
            def fn():
                loss, _ = bptt_window(model, x, y, w, model.initial_state(BATCH))
                torch.autograd.grad(loss, list(model.parameters()))
            row["sec"] = timed(fn, device, min_time, 20) / WINDOW
            continue
        need = influence_bytes(model, method)
        if need > budget:
            row["note"] = f"skipped: influence {need / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB"
            continue
        online = Online(model, method, BATCH, torch.Generator().manual_seed(1))
        state = {"s": model.initial_state(BATCH), "t": 0}
        eff = model.effective()

        def fn():
            t = state["t"] % WINDOW
            state["s"], _ = online.step(x[t], state["s"], y[t], w[t], eff)
            state["t"] += 1
        row["sec"] = timed(fn, device, min_time, 50)
        if method == "snap1":
            row["floor"] = 2 * online.J.numel() * online.J.element_size() / bandwidth
        online = None   # free the influence before the next method
    base = next((r["sec"] for r in rows if r["method"] == "bptt" and "sec" in r), None)
    for r in rows:
        if "sec" in r and base:
            r["vs_bptt"] = r["sec"] / base
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="hidden 32 and 64: a few seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="largest influence to try (default 1.5 on CPU, 40 on CUDA)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds to time each entry")
    parser.add_argument("--methods", default="bptt,snap1,snap2,rtrl,uoro")
    parser.add_argument("--cells", default="gru,lstm")
    parser.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine; "
                             "use with --threads 1)")
    args = parser.parse_args(argv)
    global clock
    clock = CLOCK[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    budget = (args.budget_gib or (40.0 if device.type == "cuda" else 1.5)) * 2**30
    hiddens = [32, 64] if args.quick else [128, 512]
    min_time = args.min_time or (0.05 if args.quick else 0.4)
    bandwidth = copy_bandwidth(device, 64 if args.quick else 512)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; {args.clock} clock; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); "
          f"batch {BATCH}; "
          f"bptt window {WINDOW}; float32")
    header = (f"{'cell':5} {'hidden':>6} {'sparse':>6} {'method':7} {'ms/step':>10} {'x bptt':>8} {'x dense':>8} "
              f"{'floor ms':>9} {'x floor':>8}")
    print(header)
    print("-" * len(header))
    for cell in args.cells.split(","):
        for hidden in hiddens:
            dense_bptt = None  # BPTT on the dense network: the reference of the sparse rows' "x dense"
            for density in (1.0, 0.1):
                rows = bench_network(cell, hidden, density, args.methods.split(","), device, bandwidth,
                                     budget, min_time)
                if density == 1.0:
                    dense_bptt = next((r["sec"] for r in rows if r["method"] == "bptt" and "sec" in r), None)
                for r in rows:
                    lead = f"{r['cell']:5} {r['hidden']:>6} {r['sparsity']:>6.2f} {r['method']:7}"
                    if "sec" not in r:
                        print(f"{lead} {r['note']}")
                        continue
                    floor = r.get("floor")
                    vs_dense = f"{r['sec'] / dense_bptt:>8.2f}" if density < 1.0 and dense_bptt else " " * 8
                    tail = f" {floor * 1e3:>9.3f} {r['sec'] / floor:>8.2f}" if floor else ""
                    line = f"{lead} {r['sec'] * 1e3:>10.3f} {r.get('vs_bptt', float('nan')):>8.2f} {vs_dense}{tail}"
                    print(line.rstrip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
