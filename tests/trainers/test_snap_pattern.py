"""SnAp-n's two sparsity patterns (``jacobian``, ``unit``) against an independent float64 reference.

The reference builds SnAp-n from its definition, with none of the trainer's code but the
parameters and masks: its own GRU/LSTM step (the equations of ``trainers/snap/cells.py``), the
full RTRL influence ``J_t = D_t J_{t-1} + I_t`` per example from autograd Jacobians of that
step, masked to the pattern after every step, and ``dL/dtheta = sum_t (dL_t/ds_t) J_t``.

The pattern comes from the Jacobians' zeros at a generic point (random state and dense random
input, float64: structural zeros are exact zeros, others are not):

- ``jacobian``: ``M_1`` = the pattern of the immediate Jacobian ``I``, ``M_n = M_1 | D M_{n-1}``
  (per state component: an LSTM output-gate parameter of unit i never reaches c_i in one step);
- ``unit``: every state component of the units reachable within n - 1 steps (the unit graph
  of D, self loops included) from the unit a parameter feeds.

The trainer's gradients (its torch path and, for SnAp-1, its C loops; dense and sparse; the
C loops' generic and vectorised batches) must match to 1e-10.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainers.snap import SparseRNN, sequence_gradient, snap1
from trainers.snap.influence import Online, pattern_keep

DT = torch.float64


def rel_err(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b) ** 0.5
    den = sum((b[k] ** 2).sum() for k in b) ** 0.5
    return float(num / den)


def problem(cell: str, density: float, B: int, hidden: int = 6, T: int = 9, seed: int = 0, **kwargs):
    model = SparseRNN(cell, 5, hidden, 4, density=density, seed=seed, dtype=DT, **kwargs)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # coupled units, gates away from their defaults
        model.U.mul_(3.0)
        model.b.add_(0.3 * torch.randn(model.b.shape, generator=g, dtype=DT))
    x = F.one_hot(torch.randint(0, 5, (T, B), generator=g), 5).to(DT)
    y = torch.randint(0, 4, (T, B), generator=g)
    y[0] = -1  # no loss at the first step
    y[4, : B // 2 + 1] = -1  # some ignored targets
    return model, x, y


# -- the reference -------------------------------------------------------------------------------

def ref_step(cell: str, x, s, W, U, b, mask_w, mask_u):
    """One step for one example: ``x (I,)``, ``s (H, c)`` -> ``(H, c)``; gates in the order
    GRU (z, r, n), LSTM (i, f, g, o); the GRU's reset gate multiplies ``U_n h``."""
    W, U = W * mask_w, U * mask_u
    h = s[:, 0]
    aw = W @ x + b  # (G, H)
    au = U @ h
    if cell == "gru":
        z, r = torch.sigmoid(aw[0] + au[0]), torch.sigmoid(aw[1] + au[1])
        n = torch.tanh(aw[2] + r * au[2])
        return ((1 - z) * n + z * h)[:, None]
    a = aw + au
    i, f, o, g = torch.sigmoid(a[0]), torch.sigmoid(a[1]), torch.sigmoid(a[3]), torch.tanh(a[2])
    c = f * s[:, 1] + i * g
    return torch.stack([o * torch.tanh(c), c], -1)


def ref_jacobians(model: SparseRNN, x, s):
    """``(D (S, S), I (S, P))`` of :func:`ref_step` at one example; P orders W, U, b flattened."""
    S = s.numel()
    D, JW, JU, Jb = torch.autograd.functional.jacobian(
        lambda s_, W, U, b: ref_step(model.cell, x, s_, W, U, b, model.mask_w, model.mask_u),
        (s, model.W.detach(), model.U.detach(), model.b.detach()))
    return D.reshape(S, S), torch.cat([JW.reshape(S, -1), JU.reshape(S, -1), Jb.reshape(S, -1)], 1)


def ref_pattern(model: SparseRNN, n: int, pattern: str) -> torch.Tensor:
    """The kept entries ``M (S, P)`` of SnAp-n, from the Jacobians' zeros at a generic point."""
    g = torch.Generator().manual_seed(7)
    H, c = model.hidden, model.components
    s = torch.randn(H, c, generator=g, dtype=DT)
    x = torch.rand(model.inputs, generator=g, dtype=DT) + 0.5
    D, I = ref_jacobians(model, x, s)
    Dp, Ip = D != 0, I != 0
    if pattern == "full":
        return torch.ones_like(Ip)
    if pattern == "jacobian":
        M = Ip.clone()
        for _ in range(n - 1):
            M = Ip | ((Dp.to(DT) @ M.to(DT)) > 0)
        return M
    # unit: the unit each parameter feeds (none for a masked one), the unit graph's reach
    unit_rows = Ip.reshape(H, c, -1).any(1)  # (H, P)
    assert (unit_rows.sum(0) <= 1).all()  # a parameter feeds one unit
    A = Dp.reshape(H, c, H, c).any(3).any(1) | torch.eye(H, dtype=torch.bool)
    R = torch.eye(H, dtype=torch.bool)
    for _ in range(n - 1):
        R = (A.to(DT) @ R.to(DT)) > 0
    kept_units = (R.to(DT) @ unit_rows.to(DT)) > 0  # (H, P): unit i is reached from p's unit
    return kept_units[:, None, :].expand(H, c, -1).reshape(H * c, -1)


def reference_gradient(model: SparseRNN, x, y, n: int, pattern: str) -> dict[str, torch.Tensor]:
    """SnAp-n by its definition: ``J_t = M * (D_t J_{t-1} + I_t)`` per example, full storage."""
    T, B = y.shape
    H, c, G, I = model.hidden, model.components, model.gates, model.inputs
    M = ref_pattern(model, n, pattern).to(DT)
    weights = (y >= 0).to(DT) / (y >= 0).sum()
    J = torch.zeros(B, H * c, M.shape[1], dtype=DT)
    grad = torch.zeros(M.shape[1], dtype=DT)
    s = torch.zeros(B, H, c, dtype=DT)
    out_w, out_b = model.out_w.detach().clone().requires_grad_(), model.out_b.detach().clone().requires_grad_()
    readout_loss = torch.zeros((), dtype=DT)
    for t in range(T):
        s_new = torch.empty_like(s)
        for b in range(B):
            D, Im = ref_jacobians(model, x[t, b], s[b])
            J[b] = M * (D @ J[b] + Im)
            with torch.no_grad():
                s_new[b] = ref_step(model.cell, x[t, b], s[b], model.W, model.U, model.b, model.mask_w, model.mask_u)
        s = s_new
        if y[t].ge(0).any():
            sv = s.clone().requires_grad_()
            logits = sv[..., 0] @ out_w.T + out_b
            loss = (F.cross_entropy(logits, y[t].clamp(min=0), reduction="none") * weights[t]).sum()
            eps, = torch.autograd.grad(loss, sv, retain_graph=True)
            readout_loss = readout_loss + loss
            grad += torch.einsum("bs,bsp->p", eps.reshape(B, -1), J)
    g_out_w, g_out_b = torch.autograd.grad(readout_loss, (out_w, out_b))
    nW, nU = G * H * I, G * H * H
    return {"W": grad[:nW].view(G, H, I), "U": grad[nW:nW + nU].view(G, H, H), "b": grad[nW + nU:].view(G, H),
            "out_w": g_out_w, "out_b": g_out_b}


# -- the reference itself ------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_reference_step_is_the_cell(cell):
    model, x, _ = problem(cell, 0.4, B=3)
    s = torch.randn(3, model.hidden, model.components, dtype=DT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.step(x[0], s)
        got = torch.stack([ref_step(cell, x[0, b], s[b], model.W, model.U, model.b, model.mask_w, model.mask_u)
                           for b in range(3)])
    assert torch.allclose(got, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_reference_without_pattern_is_bptt(cell):
    """Unmasked, the reference is RTRL: it must equal autograd through the unrolled sequence."""
    model, x, y = problem(cell, 0.4, B=3)
    assert rel_err(reference_gradient(model, x, y, 1, "full"), sequence_gradient(model, x, y, "bptt")) < 1e-10


def test_reference_patterns_nest_and_differ_on_lstm():
    """jacobian is inside unit; on an LSTM it drops (c_u, output gate of u) from SnAp-1."""
    model, _, _ = problem("lstm", 0.4, B=3)
    H, G, I = model.hidden, model.gates, model.inputs
    for n in (1, 2, 3):
        jac, unit = ref_pattern(model, n, "jacobian"), ref_pattern(model, n, "unit")
        assert not (jac & ~unit).any()
        assert (unit & ~jac).any() or n > 1  # on this small graph both fill up from n = 3
    jac1 = ref_pattern(model, 1, "jacobian").view(H, 2, -1)
    bias = jac1[..., G * H * I + G * H * H:].view(H, 2, G, H)  # the biases' columns
    for u in range(H):
        assert bias[u, 0, :, u].all() and bias[u, 1, :3, u].all() and not bias[u, 1, 3, u]


# -- the trainer against the reference -------------------------------------------------------------

CASES = [(cell, density, pattern, n, B)
         for cell in ("gru", "lstm") for density in (1.0, 0.4) for pattern in ("jacobian", "unit")
         for n, B in ((1, 3), (1, 8), (2, 3), (3, 3)) if not (n == 3 and density == 1.0)]


@pytest.mark.parametrize("cell,density,pattern,n,B", CASES)
def test_trainer_snap_matches_reference(cell, density, pattern, n, B, monkeypatch):
    model, x, y = problem(cell, density, B)
    ref = reference_gradient(model, x, y, n, pattern)
    paths = [False, True] if n == 1 else [False]  # SnAp-1: the torch path and the C loops
    for use_c in paths:
        monkeypatch.setattr(snap1, "NATIVE", use_c)
        online = Online(model, f"snap{n}", B, pattern=pattern)
        if use_c:  # the C loops really run (a C compiler is part of this project's machines)
            assert online._native is not None and (online.snap1.native is not None or model.cell == "gru")
        got = sequence_gradient(model, x, y, f"snap{n}", pattern=pattern)
        assert rel_err(got, ref) < 1e-10, (use_c, rel_err(got, ref))


@pytest.mark.parametrize("density", [1.0, 0.4])
@pytest.mark.parametrize("n", [1, 2])
def test_patterns_coincide_on_gru_and_differ_on_lstm(density, n, monkeypatch):
    for use_c in ([False, True] if n == 1 else [False]):
        monkeypatch.setattr(snap1, "NATIVE", use_c)
        model, x, y = problem("gru", density, 8)
        a = sequence_gradient(model, x, y, f"snap{n}", pattern="jacobian")
        assert rel_err(a, sequence_gradient(model, x, y, f"snap{n}", pattern="unit")) < 1e-12
        model, x, y = problem("lstm", density, 8)
        a = sequence_gradient(model, x, y, f"snap{n}", pattern="jacobian")
        if n == 2 and density == 1.0:  # SnAp-2 on a dense network is RTRL under both patterns
            assert rel_err(a, sequence_gradient(model, x, y, f"snap{n}", pattern="unit")) < 1e-10
        else:
            assert rel_err(a, sequence_gradient(model, x, y, f"snap{n}", pattern="unit")) > 1e-6


def test_trainer_pattern_from_masks_matches_reference():
    """The trainer's jacobian pattern (from the masks) is the reference's (from the Jacobians)."""
    model, _, _ = problem("lstm", 0.4, B=3, hidden=8, seed=3)
    H, c, G, I = model.hidden, model.components, model.gates, model.inputs
    for n in (1, 2, 3, 4):
        P = pattern_keep(model, n)  # (S, H, G)
        ref = ref_pattern(model, n, "jacobian")[:, G * H * I + G * H * H:].view(H * c, G, H)  # bias columns
        assert torch.equal(P, ref.permute(0, 2, 1))


def test_snap_large_order_jacobian_pattern_is_rtrl():
    """Far enough (past the state graph's diameter) both patterns keep everything: RTRL."""
    model, x, y = problem("lstm", 0.25, B=3, hidden=10, seed=3)
    rtrl = sequence_gradient(model, x, y, "rtrl")
    assert rel_err(sequence_gradient(model, x, y, "snap20", pattern="jacobian"), rtrl) < 1e-10
    assert rel_err(sequence_gradient(model, x, y, "snap2", pattern="jacobian"), rtrl) > 1e-6


def test_config_snap_pattern():
    from trainers.snap.config import Config

    assert Config(task="copy").snap_pattern == "jacobian"
    with pytest.raises(ValueError, match="snap_pattern must be jacobian or unit"):
        Config(task="copy", snap_pattern="units")
    with pytest.raises(ValueError, match="pattern must be one of"):
        Online(problem("gru", 1.0, 3)[0], "snap1", 3, pattern="bogus")
