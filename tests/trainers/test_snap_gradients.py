"""SnAp gradient identities, in float64 against autograd through the unrolled sequence.

The reference is ``method="bptt"``: plain autograd over the cell's forward pass. The online
methods use the cells' analytic Jacobians and their own influence bookkeeping, so agreement
to 1e-10 checks both.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F

from trainers.snap import SparseRNN, sequence_gradient
from trainers.snap.influence import Online, parse_method, reach_rows
from trainers.snap.snap1 import Snap1

DT = torch.float64


def rel_err(a: dict, b: dict) -> float:
    """Relative error of the whole gradient (all parameters concatenated)."""
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b) ** 0.5
    den = sum((b[k] ** 2).sum() for k in b) ** 0.5
    return float(num / den)


def problem(cell: str, density: float, hidden: int = 6, T: int = 9, B: int = 3, seed: int = 0,
            **kwargs):
    """A small model and a random one-hot sequence with a loss at most steps."""
    model = SparseRNN(cell, 5, hidden, 4, density=density, seed=seed, dtype=DT, **kwargs)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # larger weights than the default init: more interaction between units
        model.U.mul_(3.0)
        model.b.add_(0.3 * torch.randn(model.b.shape, generator=g))
    x = F.one_hot(torch.randint(0, 5, (T, B), generator=g), 5).to(DT)
    y = torch.randint(0, 4, (T, B), generator=g)
    y[0] = -1  # no loss at the first step: ignored targets must work
    return model, x, y


def diameter(adjacency: torch.Tensor) -> int:
    """Longest shortest path (in steps) between units of the recurrent graph, by BFS."""
    H = adjacency.shape[0]
    longest = 0
    for source in range(H):
        dist = {source: 0}
        queue = collections.deque([source])
        while queue:
            j = queue.popleft()
            for i in range(H):  # edge j -> i when unit i depends on unit j
                if adjacency[i, j] and i not in dist:
                    dist[i] = dist[j] + 1
                    queue.append(i)
        longest = max(longest, max(dist.values()))
    return longest


CASES = [(cell, density) for cell in ("gru", "lstm") for density in (1.0, 0.4)]


@pytest.mark.parametrize("cell,density", CASES)
def test_rtrl_equals_bptt(cell, density):
    model, x, y = problem(cell, density)
    assert rel_err(sequence_gradient(model, x, y, "rtrl"), sequence_gradient(model, x, y, "bptt")) < 1e-10


@pytest.mark.parametrize("cell,density", CASES)
def test_rtrl_reset_each_window_equals_truncated_bptt(cell, density):
    model, x, y = problem(cell, density, T=10)
    truncated = sequence_gradient(model, x, y, "bptt", window=4)
    assert rel_err(sequence_gradient(model, x, y, "rtrl", window=4), truncated) < 1e-10
    # and truncation matters here, so the check above is not vacuous
    assert rel_err(sequence_gradient(model, x, y, "bptt"), truncated) > 1e-3


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_snap_beyond_diameter_equals_rtrl(cell):
    model, x, y = problem(cell, 0.25, hidden=10, seed=3)
    d = diameter(model.recurrent_adjacency())
    assert 2 <= d < 10  # a sparse graph where some pairs are several steps apart
    rtrl = sequence_gradient(model, x, y, "rtrl")
    assert rel_err(sequence_gradient(model, x, y, f"snap{d + 1}"), rtrl) < 1e-10
    assert rel_err(sequence_gradient(model, x, y, f"snap{d}"), rtrl) > 1e-8


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_snap2_equals_rtrl_on_dense(cell):
    model, x, y = problem(cell, 1.0)
    assert rel_err(sequence_gradient(model, x, y, "snap2"), sequence_gradient(model, x, y, "rtrl")) < 1e-10


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_snap1_equals_bptt_with_diagonal_recurrence(cell):
    """Independent units: SnAp-1 with the ``unit`` pattern (every own component) is exact. The
    ``jacobian`` pattern is exact on the GRU (one component: the same pattern); on the LSTM it
    drops (c_u, output gate of u), which the diagonal recurrence reaches after two steps."""
    model, x, y = problem(cell, 1.0, diagonal_recurrent=True)
    bptt = sequence_gradient(model, x, y, "bptt")
    assert rel_err(sequence_gradient(model, x, y, "snap1", pattern="unit"), bptt) < 1e-10
    jacobian = rel_err(sequence_gradient(model, x, y, "snap1", pattern="jacobian"), bptt)
    assert jacobian < 1e-10 if cell == "gru" else jacobian > 1e-4


@pytest.mark.parametrize("cell,density", CASES)
def test_snap1_is_an_approximation(cell, density):
    model, x, y = problem(cell, density)
    assert rel_err(sequence_gradient(model, x, y, "snap1"), sequence_gradient(model, x, y, "rtrl")) > 1e-3


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_snap_error_falls_with_order_on_sparse(cell):
    model, x, y = problem(cell, 0.25, hidden=10, seed=3)
    rtrl = sequence_gradient(model, x, y, "rtrl")
    d = diameter(model.recurrent_adjacency())
    errors = [rel_err(sequence_gradient(model, x, y, f"snap{n}"), rtrl) for n in range(1, d + 2)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-10


def test_uoro_is_unbiased():
    """Mean of many UORO estimates -> the RTRL gradient, within 5 standard errors per entry.

    The sequence is replicated across the batch, so one call averages ``B`` independent
    estimates (each example draws its own signs); ``groups`` calls give the spread.
    """
    model, x1, y1 = problem("gru", 1.0, hidden=3, T=5, B=1)
    exact = sequence_gradient(model, x1, y1, "rtrl")
    B, groups = 500, 10
    x, y = x1.expand(-1, B, -1).contiguous(), y1.expand(-1, B).contiguous()
    gen = torch.Generator().manual_seed(0)
    draws = [sequence_gradient(model, x, y, "uoro", generator=gen) for _ in range(groups)]
    for name in ("W", "U", "b"):
        stack = torch.stack([d[name] for d in draws])
        mean, stderr = stack.mean(0), stack.std(0) / groups ** 0.5
        assert (stderr > 0).any()
        assert ((mean - exact[name]).abs() <= 5 * stderr + 1e-12).all(), name
    # the estimate is noisy (one group is not the answer), so the check above has power
    assert rel_err(draws[0], exact) > 1e-4


def test_readout_gradients_are_exact_for_every_method():
    model, x, y = problem("lstm", 0.4)
    ref = sequence_gradient(model, x, y, "bptt")
    for method in ("snap1", "snap2", "uoro"):
        got = sequence_gradient(model, x, y, method, generator=torch.Generator().manual_seed(1))
        for name in ("out_w", "out_b"):
            assert torch.allclose(got[name], ref[name], rtol=1e-10, atol=1e-14)


def test_snap_pattern_comes_from_masks_not_values():
    model, _, _ = problem("gru", 0.25, hidden=10, seed=3)
    before = Online(model, "snap2", 2).state_rows.clone()
    with torch.no_grad():
        model.U.zero_()  # numerically no coupling at all; structurally the same network
    assert torch.equal(Online(model, "snap2", 2).state_rows, before)
    assert before.shape[1] > 1


def test_influence_storage_sizes():
    model, _, _ = problem("lstm", 0.25, hidden=10, seed=3)
    B, c = 2, 2
    nnz = int(model.mask_w.sum() + model.mask_u.sum()) + model.b.numel()
    snap1 = Online(model, "snap1", B)
    assert snap1.J.numel() == B * c * nnz  # one entry per (example, own component, kept parameter)
    snap2, rtrl = Online(model, "snap2", B), Online(model, "rtrl", B)
    assert snap2.J.numel() < rtrl.J.numel()
    assert rtrl.J.numel() == B * c * 10 * nnz


def test_reach_rows_self_first():
    adj = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)  # 0 -> 1 -> 2
    assert reach_rows(adj, 1).tolist() == [[0], [1], [2]]
    assert reach_rows(adj, 2).tolist() == [[0, 1], [1, 2], [2, 3]]
    assert reach_rows(adj, 3).tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 3]]


@pytest.mark.parametrize("bad", ["snap0", "snap", "bptt2", "SNAP1", "rtrl1"])
def test_parse_method_refuses(bad):
    with pytest.raises(ValueError, match="snapN"):
        parse_method(bad)


@pytest.mark.parametrize("scale_range", [(2.0, 3.0), (0.3, 3.0), (1e-100, 1e100)])
def test_snap1_scaled_influence_folds_exactly(scale_range, monkeypatch):
    """SnAp-1 (GRU) keeps J = scale * J~; folding the scale in (always, sometimes, never) is exact."""
    monkeypatch.setitem(Snap1.SCALE_RANGE, DT, scale_range)
    model, x, y = problem("gru", 1.0, diagonal_recurrent=True, T=15)
    assert rel_err(sequence_gradient(model, x, y, "snap1"), sequence_gradient(model, x, y, "bptt")) < 1e-10


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_snap1_equals_bptt_with_diagonal_recurrence_sparse_inputs(cell):
    """Sparse W (gathered inputs, CSR forward) with independent units: SnAp-1 is still exact."""
    model, x, y = problem(cell, 0.4, diagonal_recurrent=True)
    assert not model.dense_w
    bptt = sequence_gradient(model, x, y, "bptt")
    assert rel_err(sequence_gradient(model, x, y, "snap1", pattern="unit"), bptt) < 1e-10
    if cell == "gru":  # one state component: both patterns are exact here
        assert rel_err(sequence_gradient(model, x, y, "snap1", pattern="jacobian"), bptt) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("density", [1.0, 0.4])
def test_snap1_compiled_lstm_update_is_exact(density, monkeypatch):
    """The torch.compile'd LSTM update (used for large influences) gives the eager result."""
    import shutil

    from trainers.snap import snap1

    monkeypatch.setattr(snap1, "COMPILE_MIN_ENTRIES", 0)
    monkeypatch.setattr(snap1, "_compile_failed", False)
    monkeypatch.setattr(snap1, "NATIVE", False)  # the compiled update is the eager path's (no C loops)
    model, x, y = problem("lstm", density, diagonal_recurrent=True)
    assert Online(model, "snap1", 3).snap1.compile
    bptt = sequence_gradient(model, x, y, "bptt")
    assert rel_err(sequence_gradient(model, x, y, "snap1", pattern="unit"), bptt) < 1e-10
    model, x, y = problem("lstm", density)  # coupled units: compiled == eager SnAp-1, both patterns
    compiled = {p: sequence_gradient(model, x, y, "snap1", pattern=p) for p in ("jacobian", "unit")}
    if shutil.which("g++") or shutil.which("clang++"):
        assert not snap1._compile_failed  # it really ran compiled where a compiler exists
    monkeypatch.setattr(snap1, "COMPILE_MIN_ENTRIES", 1 << 62)
    for p, grad in compiled.items():
        assert rel_err(grad, sequence_gradient(model, x, y, "snap1", pattern=p)) < 1e-12


@pytest.mark.parametrize("delay", [1, 3, 8])
def test_snap1_gru_delayed_updates_are_exact(delay, monkeypatch):
    """Dense GRU SnAp-1 batches several steps' immediate Jacobians into one product; any delay
    (1: none) gives the same gradient, across windows, folds and steps without a loss."""
    from trainers.snap import snap1

    model, x, y = problem("gru", 1.0, T=20)
    y[5:7] = -1
    monkeypatch.setattr(snap1, "GRU_DELAY", 1)
    reference = sequence_gradient(model, x, y, "snap1", window=7)
    monkeypatch.setattr(snap1, "GRU_DELAY", delay)
    assert rel_err(sequence_gradient(model, x, y, "snap1", window=7), reference) < 1e-12
    monkeypatch.setitem(Snap1.SCALE_RANGE, DT, (0.3, 3.0))  # folds too
    assert rel_err(sequence_gradient(model, x, y, "snap1", window=7), reference) < 1e-12
    with torch.no_grad():  # diagonal recurrence on a dense-input network: exact SnAp-1
        model.U.mul_(torch.eye(model.hidden, dtype=DT))
    assert rel_err(sequence_gradient(model, x, y, "snap1"), sequence_gradient(model, x, y, "bptt")) < 1e-10
