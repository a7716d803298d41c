"""Sparse GRU and LSTM cells with analytic one-step Jacobians, and a linear read-out.

Every weight matrix has a fixed random sparsity pattern drawn at initialisation with the same
number of non-zeros in every row (``round(density * columns)``, at least one). A constant row
count lets the online methods keep "the parameters feeding unit u" as a dense ``(H, m)``
block with the same ``m`` for every unit (see :mod:`trainers.snap.influence`), which is what
makes SnAp-1 a handful of fused tensor operations instead of per-parameter loops.

State layout: ``s`` is ``(B, H, c)`` with ``c = 1`` for the GRU (``h``) and ``c = 2`` for the
LSTM (``h``, cell ``c``); the flattened state index of unit ``u``, component ``k`` is
``u * c + k``. Parameters feeding unit ``u`` affect only unit ``u``'s components within one
step; the recurrent matrices decide which units reach which over several steps.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

__all__ = ["GATES", "COMPONENTS", "Jacobian", "SparseRNN", "row_pattern"]

#: gates per cell: GRU (update z, reset r, candidate n); LSTM (input i, forget f, cell g, output o)
GATES = {"gru": 3, "lstm": 4}
#: state components per unit
COMPONENTS = {"gru": 1, "lstm": 2}


def row_pattern(rows: int, cols: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """Column indices ``(rows, k)`` (sorted) of a random pattern with ``k`` non-zeros per row."""
    k = cols if density >= 1.0 else max(1, min(cols, round(density * cols)))
    if k == cols:
        return torch.arange(cols).expand(rows, cols).clone()
    order = torch.rand(rows, cols, generator=generator).argsort(dim=1)
    return order[:, :k].sort(dim=1).values


@dataclasses.dataclass
class Jacobian:
    """The pieces of one step's Jacobians, per unit (B batch, H units, c components, G gates).

    - ``dW[b, u, k, g]``: d s'[u, k] / d (pre-activation of gate g at u from ``W x + b``);
      the immediate influence of ``W[g, u, j]`` is ``dW[b, u, k, g] * x[b, j]`` and of
      ``b[g, u]`` is ``dW[b, u, k, g]``;
    - ``dU[b, u, k, g]``: the same for the recurrent product ``(U_g h)[u]``; the immediate
      influence of ``U[g, u, j]`` is ``dU[b, u, k, g] * h[b, j]``;
    - ``E[b, u, k, l]``: d s'[u, k] / d s[u, l] apart from the recurrent products (the
      GRU's ``z``; the LSTM's cell path), so that
      ``D = ds'/ds = sum_g diag(dU[..., g]) U_g (into the h columns) + blockdiag(E)``.
    """

    dW: torch.Tensor
    dU: torch.Tensor
    E: torch.Tensor
    h: torch.Tensor  # h of the previous state (B, H): the input of the recurrent products


class SparseRNN(nn.Module):
    """A one-layer GRU or LSTM with fixed random weight sparsity, and a linear read-out.

    ``diagonal_recurrent`` keeps only the diagonal of every recurrent matrix (for tests).
    Parameters ``W (G, H, I)``, ``U (G, H, H)``, ``b (G, H)``, ``out_w (O, H)``, ``out_b (O)``;
    masked entries are stored as zeros and multiplied by their mask in every use, so their
    gradients are zero and Adam leaves them at zero.

    The GRU candidate is ``n = tanh(W_n x + b_n + r * (U_n h))``: the reset gate multiplies
    the *result* of the recurrent product. With the textbook ``U_n (r * h)`` a parameter of
    unit j's reset gate would change ``r_j``, hence every ``n_i`` with ``U_n[i, j] != 0``,
    within the same step: its immediate influence would leave its own unit, and SnAp-1 (one
    influence entry per parameter, for its own unit) would no longer hold the exact
    immediate Jacobian. Applied after the product, every parameter's immediate influence
    stays on the unit it feeds (the variant cuDNN and PyTorch's ``nn.GRU`` use too).
    """

    def __init__(self, cell: str, inputs: int, hidden: int, outputs: int, density: float = 1.0,
                 seed: int = 0, dtype: torch.dtype = torch.float32, diagonal_recurrent: bool = False) -> None:
        super().__init__()
        if cell not in GATES:
            raise ValueError(f"cell must be one of {sorted(GATES)}, got {cell!r}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got density={density}")
        self.cell, self.inputs, self.hidden, self.outputs = cell, inputs, hidden, outputs
        self.density = density
        G, H, I = GATES[cell], hidden, inputs
        self.gates, self.components = G, COMPONENTS[cell]
        gen = torch.Generator().manual_seed(seed)
        cols_w = torch.stack([row_pattern(H, I, density, gen) for _ in range(G)])  # (G, H, nW)
        cols_u = torch.stack([row_pattern(H, H, density, gen) for _ in range(G)])  # (G, H, nU)
        if diagonal_recurrent:  # independent units: each sees only its own past (SnAp-1 is exact)
            cols_u = torch.arange(H).view(1, H, 1).repeat(G, 1, 1)
        self.register_buffer("cols_w", cols_w)
        self.register_buffer("cols_u", cols_u)
        self.register_buffer("mask_w", torch.zeros(G, H, I, dtype=dtype).scatter_(2, cols_w, 1.0))
        self.register_buffer("mask_u", torch.zeros(G, H, H, dtype=dtype).scatter_(2, cols_u, 1.0))
        self.dense_w = cols_w.shape[-1] == I
        self.dense_u = cols_u.shape[-1] == H

        def uniform(shape, fan_in):
            bound = 1.0 / math.sqrt(max(1, fan_in))
            return (torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) * bound

        # Fan-in counts only the kept entries, so sparse units start at the same scale as dense.
        fan = cols_w.shape[-1] + cols_u.shape[-1]
        self.W = nn.Parameter(uniform((G, H, I), fan) * self.mask_w)
        self.U = nn.Parameter(uniform((G, H, H), fan) * self.mask_u)
        b = torch.zeros(G, H, dtype=dtype)
        if cell == "lstm":
            b[1] = 1.0  # forget-gate bias 1: remember by default
        self.b = nn.Parameter(b)
        self.out_w = nn.Parameter(uniform((outputs, H), H))
        self.out_b = nn.Parameter(torch.zeros(outputs, dtype=dtype))

    # -- sizes ---------------------------------------------------------------------------
    @property
    def per_unit(self) -> int:
        """Recurrent-cell parameters feeding one unit: ``G * (nW + nU + 1)``."""
        return self.gates * (self.cols_w.shape[-1] + self.cols_u.shape[-1] + 1)

    def recurrent_adjacency(self) -> torch.Tensor:
        """``A[i, j]``: unit i's next state depends on unit j's state (self loops included)."""
        adj = self.mask_u.sum(0) > 0
        return adj | torch.eye(self.hidden, dtype=torch.bool, device=adj.device)

    def initial_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.hidden, self.components, dtype=self.W.dtype, device=self.W.device)

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The masked weights ``(W * mask_w, U * mask_u)``."""
        return self.W * self.mask_w, self.U * self.mask_u

    # -- one step ------------------------------------------------------------------------
    def _preacts(self, x, h, W, U):
        G, H = self.gates, self.hidden
        aw = (x @ W.reshape(G * H, -1).T).view(-1, G, H) + self.b
        au = (h @ U.reshape(G * H, H).T).view(-1, G, H)
        return aw, au

    def step(self, x: torch.Tensor, s: torch.Tensor, weights=None) -> torch.Tensor:
        """Next state ``(B, H, c)`` from input ``x (B, I)`` and state ``s``; autograd-friendly."""
        return self.step_jacobian(x, s, weights, jacobian=False)[0]

    def step_jacobian(self, x: torch.Tensor, s: torch.Tensor, weights=None,
                      jacobian: bool = True, preacts=None) -> tuple[torch.Tensor, Jacobian | None]:
        """Next state and (when ``jacobian``) the analytic :class:`Jacobian` of the step.

        ``preacts``: the pre-activations ``(W x + b, U h)``, each ``(B, G, H)``, when the caller
        has them already (the online methods compute them on the kept weights only).
        """
        h = s[..., 0]
        if preacts is None:
            W, U = weights if weights is not None else self.effective()
            aw, au = self._preacts(x, h, W, U)
        else:
            aw, au = preacts
        if self.cell == "gru":
            z = torch.sigmoid(aw[:, 0] + au[:, 0])
            r = torch.sigmoid(aw[:, 1] + au[:, 1])
            mn = au[:, 2]
            n = torch.tanh(aw[:, 2] + r * mn)
            h_new = (1 - z) * n + z * h
            new = h_new.unsqueeze(-1)
            if not jacobian:
                return new, None
            dn = (1 - z) * (1 - n * n)
            dz = (h - n) * z * (1 - z)
            dr = dn * mn * r * (1 - r)
            dW = torch.stack([dz, dr, dn], -1).unsqueeze(2)
            dU = torch.stack([dz, dr, dn * r], -1).unsqueeze(2)
            E = z[..., None, None]
            return new, Jacobian(dW, dU, E, h)
        c = s[..., 1]
        a = aw + au
        i, f, o = torch.sigmoid(a[:, 0]), torch.sigmoid(a[:, 1]), torch.sigmoid(a[:, 3])
        g = torch.tanh(a[:, 2])
        c_new = f * c + i * g
        tc = torch.tanh(c_new)
        h_new = o * tc
        new = torch.stack([h_new, c_new], -1)
        if not jacobian:
            return new, None
        dc = torch.stack([g * i * (1 - i), c * f * (1 - f), i * (1 - g * g), torch.zeros_like(c)], -1)
        k = (o * (1 - tc * tc)).unsqueeze(-1)
        dh = k * dc
        dh[..., 3] = tc * o * (1 - o)
        d = torch.stack([dh, dc], 2)  # (B, H, 2, G)
        zero = torch.zeros_like(f)
        E = torch.stack([torch.stack([zero, k[..., 0] * f], -1), torch.stack([zero, f], -1)], -2)
        return new, Jacobian(d, d, E, h)

    # -- read-out ------------------------------------------------------------------------
    def logits(self, s: torch.Tensor) -> torch.Tensor:
        return s[..., 0] @ self.out_w.T + self.out_b

    def readout_grad(self, s: torch.Tensor, target: torch.Tensor, weight: torch.Tensor):
        """Analytic loss and gradients of the read-out for one step (no autograd).

        ``loss = sum_b weight[b] * CE(logits[b], target[b])`` (nats; ``weight`` is zero where
        ``target < 0``). Returns ``(loss, d out_w, d out_b, dL/ds (B, H, c))``.
        """
        h = s[..., 0]
        logits = h @ self.out_w.T + self.out_b
        logp = torch.log_softmax(logits, -1)
        safe = target.clamp(min=0)
        loss = -(logp.gather(1, safe[:, None])[:, 0] * weight).sum()
        dlog = logp.exp().scatter_add_(1, safe[:, None], -torch.ones_like(logp[:, :1]))
        dlog = dlog * weight[:, None]
        eps = torch.zeros_like(s)
        eps[..., 0] = dlog @ self.out_w
        return loss, dlog.T @ h, dlog.sum(0), eps

    def readout_accumulate(self, h: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                           g_out_w: torch.Tensor, g_out_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`readout_grad` from ``h (B, H)``, adding the read-out's gradients into
        ``g_out_w``, ``g_out_b`` in place; returns ``(loss, dL/dh (B, H))`` (the loss does not
        depend on the cell state ``c``). Fewer, in-place operations: SnAp-1's step."""
        logp = torch.log_softmax(torch.addmm(self.out_b, h, self.out_w.T), -1)
        safe = target.clamp(min=0)[:, None]
        loss = -(logp.gather(1, safe)[:, 0] * weight).sum()
        dlog = logp.exp_().scatter_add_(1, safe, -torch.ones_like(logp[:, :1])).mul_(weight[:, None])
        g_out_w.addmm_(dlog.T, h)
        g_out_b.add_(dlog.sum(0))
        return loss, dlog @ self.out_w

    def apply_D(self, jac: Jacobian, U: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``D v`` for a state-shaped ``v (B, H, c)`` without forming D (used by UORO)."""
        G, H = self.gates, self.hidden
        uv = (v[..., 0] @ U.reshape(G * H, H).T).view(-1, G, H).transpose(1, 2)  # (B, H, G)
        return torch.einsum("bukg,bug->buk", jac.dU, uv) + torch.einsum("bukl,bul->buk", jac.E, v)

    def full_D(self, jac: Jacobian, U: torch.Tensor) -> torch.Tensor:
        """The dense state Jacobian ``D (B, S, S)``, ``S = H * c`` (for RTRL and SnAp-n >= 2)."""
        B, H, c = jac.E.shape[0], self.hidden, self.components
        D = torch.zeros(B, H, c, H, c, dtype=U.dtype, device=U.device)
        D[..., 0] = torch.einsum("bukg,guj->bukj", jac.dU, U)
        diag = D.diagonal(dim1=1, dim2=3)  # (B, c, c, H) view
        diag += jac.E.permute(0, 2, 3, 1)
        return D.view(B, H * c, H * c)
