"""Online gradients: RTRL, SnAp-n and UORO, all carrying an influence forward in time.

RTRL keeps the influence ``J_t = ds_t/dtheta`` exactly: ``J_t = I_t + D_t J_{t-1}`` with
``I_t`` the immediate Jacobian and ``D_t = ds_t/ds_{t-1}``; the gradient is
``sum_t (dL_t/ds_t) J_t``. Only the recurrent cell's parameters need an influence; the
read-out's gradient is immediate.

Influence layout. Parameters are grouped by the unit ``u`` they feed: ``m`` of them per unit
(``G * (nW + nU + 1)``: the kept entries of row ``u`` of every gate's ``W`` and ``U``, and
the bias), the same ``m`` for every unit (see :func:`trainers.snap.cells.row_pattern`).

- SnAp-1 keeps, for a parameter of unit u, only the influence on unit u's own state:
  ``J (H, B, c, m)``. The update needs just the ``c x c`` diagonal blocks of ``D``, O(|theta|)
  per step, with no dense J and no per-parameter loop: for the GRU, J is kept as
  ``scale * J~`` so that ``J <- D_uu * J + I`` is in-place ``addcmul`` over disjoint slices
  (one read and one write of J~) and a multiply of the small ``(H, B)`` scale; for the LSTM,
  in-place products with the 2 x 2 blocks.
- SnAp-n (n >= 2) keeps the influence on the units reachable from u within ``n - 1`` steps
  of the recurrent graph (from the sparsity masks, never from values that happen to be
  zero): ``J (H, B, R * c, m)``, R the largest reach (padded with an all-zero dummy unit):
  sparse storage, of size |theta| x reach rather than |theta| x H. Its update is one batched
  product with the ``(R c) x (R c)`` sub-blocks of ``D``.
- RTRL keeps everything: ``J (B, S, H, m)``, ``S = H * c``; one batched ``D @ J`` a step.
- UORO (Tallec & Ollivier, 2017) keeps a rank-one estimate ``s~ theta~^T`` of J, per example,
  refreshed with random signs; its gradient estimate is unbiased.
"""

from __future__ import annotations

import re

import torch

from trainers.snap.cells import Jacobian, SparseRNN

__all__ = ["Online", "parse_method", "reach_rows"]

_SNAP = re.compile(r"snap([1-9][0-9]*)")


def parse_method(method: str) -> tuple[str, int]:
    """``"bptt" | "rtrl" | "uoro" | "snapN"`` (N >= 1) -> ``(kind, N)`` (N = 0 unless snap)."""
    if method in ("bptt", "rtrl", "uoro"):
        return method, 0
    m = _SNAP.fullmatch(method)
    if m is None:
        raise ValueError(f"method must be bptt, rtrl, uoro or snapN with N >= 1 (snap1, snap2, ...), got {method!r}")
    return "snap", int(m.group(1))


def reach_rows(adjacency: torch.Tensor, n: int) -> torch.Tensor:
    """Units kept by SnAp-n for the parameters of each unit: ``(H, R)``, self first, padded with H.

    ``adjacency[i, j]``: unit i depends on unit j in one step. Unit i is kept for parameters of
    unit u iff i is reachable from u within ``n - 1`` steps.
    """
    H = adjacency.shape[0]
    a = adjacency.to(torch.float64).cpu()
    reach = torch.eye(H, dtype=torch.float64)
    for _ in range(n - 1):
        grown = ((a @ reach) > 0).to(torch.float64)
        if torch.equal(grown, reach):
            break
        reach = grown
    rows = []
    for u in range(H):
        others = [i for i in torch.nonzero(reach[:, u]).flatten().tolist() if i != u]
        rows.append([u] + others)
    width = max(len(r) for r in rows)
    return torch.tensor([r + [H] * (width - len(r)) for r in rows], dtype=torch.long)


class Online:
    """Carries an influence and accumulates the gradient of a sequence loss, one step at a time.

    ``step(x, s, target, weight)`` advances the state and returns ``(s_new, loss)``; the
    gradient so far is in :meth:`gradients` (dense, shaped like the model's parameters).
    ``reset_influence()`` forgets the past (a truncation point); ``zero_grad()`` starts a new
    accumulation (after a parameter update). Everything runs under ``torch.no_grad``.
    """

    def __init__(self, model: SparseRNN, method: str, batch: int, generator: torch.Generator | None = None) -> None:
        self.model, self.method, self.batch = model, method, batch
        self.kind, self.order = parse_method(method)
        if self.kind == "bptt":
            raise ValueError("bptt is not an online method; use trainers.snap.gradients.bptt_window")
        self.generator = generator
        p = model.W
        H, c = model.hidden, model.components
        self.G, self.nW, self.nU = model.gates, model.cols_w.shape[-1], model.cols_u.shape[-1]
        self.m = model.per_unit
        self._opts = dict(dtype=p.dtype, device=p.device)
        self.cols_w = model.cols_w.permute(1, 0, 2)  # (H, G, nW)
        self.cols_u = model.cols_u.permute(1, 0, 2)
        if self.kind == "snap" and self.order >= 2:
            rows = reach_rows(model.recurrent_adjacency(), self.order)  # (H, R)
            self.state_rows = (rows[..., None] * c + torch.arange(c)).flatten(1).to(p.device)  # (H, R c)
        self.reset_influence()
        self.zero_grad()

    # -- bookkeeping ---------------------------------------------------------------------
    def reset_influence(self) -> None:
        B, H, c, m = self.batch, self.model.hidden, self.model.components, self.m
        if self.kind == "snap" and self.order == 1:
            self.J = torch.zeros(H, B, c, m, **self._opts)
            self.scale = torch.ones(H, B, 1, 1, **self._opts) if c == 1 else None
            self._buffer = torch.empty(H, B, m, **self._opts) if c == 2 else None
        elif self.kind == "snap":
            self.J = torch.zeros(H, B, self.state_rows.shape[1], m, **self._opts)
        elif self.kind == "rtrl":
            self.J = torch.zeros(B, H * c, H, m, **self._opts)
        else:  # uoro
            self.s_tilde = torch.zeros(B, H, c, **self._opts)
            self.theta_tilde = torch.zeros(B, H, m, **self._opts)

    def zero_grad(self) -> None:
        model = self.model
        self.g_units = torch.zeros(model.hidden, self.m, **self._opts)
        self.g_out_w = torch.zeros_like(model.out_w)
        self.g_out_b = torch.zeros_like(model.out_b)

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue an interrupted sequence."""
        if self.kind == "uoro":
            return {"s_tilde": self.s_tilde, "theta_tilde": self.theta_tilde}
        return {"J": self.influence()}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value.to(self._opts["device"]))
        if getattr(self, "scale", None) is not None:
            self.scale = torch.ones_like(self.scale)

    def influence(self) -> torch.Tensor:
        """The influence as stored by the method (SnAp-1 GRU: with its row scale applied)."""
        if getattr(self, "scale", None) is not None:
            return self.J * self.scale
        return self.J

    def gradients(self) -> dict[str, torch.Tensor]:
        """The accumulated gradient, dense and named like ``model.named_parameters()``."""
        G, H, nW, nU = self.G, self.model.hidden, self.nW, self.nU
        g = self.g_units
        gw = g[:, : G * nW].reshape(H, G, nW).permute(1, 0, 2)
        gu = g[:, G * nW: G * (nW + nU)].reshape(H, G, nU).permute(1, 0, 2)
        W = torch.zeros_like(self.model.W).scatter_(2, self.model.cols_w, gw)
        U = torch.zeros_like(self.model.U).scatter_(2, self.model.cols_u, gu)
        return {"W": W, "U": U, "b": g[:, G * (nW + nU):].T.clone(),
                "out_w": self.g_out_w.clone(), "out_b": self.g_out_b.clone()}

    # -- immediate Jacobian --------------------------------------------------------------
    def _inputs(self, x: torch.Tensor, h: torch.Tensor):
        """The inputs multiplying each kept weight of each unit, as ``(H | 1, B, G | 1, n)``."""
        return (x[None, :, None, :] if self.model.dense_w else self._gather(x, self.cols_w),
                h[None, :, None, :] if self.model.dense_u else self._gather(h, self.cols_u))

    @staticmethod
    def _gather(v: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``v[b, cols[u, g, k]]`` as a contiguous ``(H, B, G, k)``.

        index_select of contiguous rows, then one transposing copy: several times faster than
        advanced indexing, and a contiguous operand keeps the following ``addcmul_`` fast.
        """
        H, G, k = cols.shape
        rows = torch.index_select(v.T.contiguous(), 0, cols.reshape(-1))  # (H G k, B)
        return rows.view(H, G, k, -1).permute(0, 3, 1, 2).contiguous()

    def _add_immediate(self, J: torch.Tensor, jac: Jacobian, x: torch.Tensor,
                       scale: torch.Tensor | None = None) -> None:
        """``J += I_t / scale`` in place, for ``J`` viewed as ``(H, B, c, m)`` (own-unit rows)."""
        G, nW, nU = self.G, self.nW, self.nU
        vw, vu = self._inputs(x, jac.h)
        dW = jac.dW.transpose(0, 1)  # (H, B, c, G)
        dU = jac.dU.transpose(0, 1)
        if scale is not None:
            dW, dU = dW / scale, dU / scale
        J[..., : G * nW].unflatten(-1, (G, nW)).addcmul_(dW.unsqueeze(-1), vw.unsqueeze(2))
        J[..., G * nW: G * (nW + nU)].unflatten(-1, (G, nU)).addcmul_(dU.unsqueeze(-1), vu.unsqueeze(2))
        J[..., G * (nW + nU):].add_(dW)

    def _noise_immediate(self, nu: torch.Tensor, jac: Jacobian, x: torch.Tensor) -> torch.Tensor:
        """``nu^T I_t`` per example, example-major and contiguous: ``(B, H, m)``."""
        B, H = self.batch, self.model.hidden

        def inputs(v, cols, dense):  # (B, H | 1, G | 1, k)
            if dense:
                return v[:, None, None, :]
            return torch.index_select(v, 1, cols.reshape(-1)).view(B, *cols.shape)

        a = torch.einsum("buk,bukg->bug", nu, jac.dW)  # (B, H, G)
        b = torch.einsum("buk,bukg->bug", nu, jac.dU)
        parts = [(a.unsqueeze(-1) * inputs(x, self.cols_w, self.model.dense_w)).flatten(2),
                 (b.unsqueeze(-1) * inputs(jac.h, self.cols_u, self.model.dense_u)).flatten(2), a]
        return torch.cat([p.expand(B, H, -1) for p in parts], -1)

    # -- one step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, x: torch.Tensor, s: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
             weights: tuple[torch.Tensor, torch.Tensor] | None = None, has_loss: bool = True):
        """Advance one step: returns ``(s_new, loss)``; accumulates the gradient of the loss."""
        model = self.model
        W, U = weights if weights is not None else model.effective()
        s_new, jac = model.step_jacobian(x, s, (W, U))
        c = model.components
        if self.kind == "snap" and self.order == 1:
            Dself = jac.E.clone()
            Dself[..., 0] += (jac.dU * U.diagonal(dim1=1, dim2=2).T[:, None, :]).sum(-1)  # (B,H,c,G).(H,1,G)
            Dself = Dself.transpose(0, 1)  # (H, B, c, c)
            if c == 1:
                self._snap1_scaled_update(Dself, jac, x)
            else:  # LSTM: 2 x 2 blocks (h, c), in place; a batched matmul of 2 x 2 blocks
                # allocates a new J each step and measured 2.4x slower at hidden 512
                Jh, Jc = self.J[:, :, 0], self.J[:, :, 1]
                torch.mul(Jh, Dself[:, :, 1, 0, None], out=self._buffer)
                Jh.mul_(Dself[:, :, 0, 0, None]).addcmul_(Jc, Dself[:, :, 0, 1, None])
                Jc.mul_(Dself[:, :, 1, 1, None]).add_(self._buffer)
                self._add_immediate(self.J, jac, x)
        elif self.kind == "snap":
            D = torch.nn.functional.pad(model.full_D(jac, U), (0, c, 0, c))
            idx = self.state_rows
            Dsub = D[:, idx[:, :, None], idx[:, None, :]].transpose(0, 1)  # (H, B, Rc, Rc)
            self.J = Dsub @ self.J
            self._add_immediate(self.J[:, :, :c], jac, x)
        elif self.kind == "rtrl":
            B, S, H, m = self.J.shape
            self.J = torch.bmm(model.full_D(jac, U), self.J.view(B, S, H * m)).view(B, S, H, m)
            own = self.J.view(B, H, c, H, m).diagonal(dim1=1, dim2=3).permute(3, 0, 1, 2)
            self._add_immediate(own, jac, x)
        else:
            self._uoro_step(jac, U, x)
        if not has_loss:
            return s_new, torch.zeros((), **self._opts)
        loss, g_ow, g_ob, eps = model.readout_grad(s_new, target, weight)
        self.g_out_w += g_ow
        self.g_out_b += g_ob
        B = self.batch
        if self.kind == "snap" and self.order == 1:
            e = eps.transpose(0, 1) if self.scale is None else eps.transpose(0, 1) * self.scale[..., 0]
            self.g_units += torch.bmm(e.reshape(model.hidden, 1, B * c),
                                      self.J.view(model.hidden, B * c, self.m)).squeeze(1)
        elif self.kind == "snap":
            ep = torch.nn.functional.pad(eps.reshape(B, -1), (0, c))
            esub = ep[:, self.state_rows].transpose(0, 1)  # (H, B, Rc)
            H, _, Rc, m = self.J.shape
            self.g_units += torch.bmm(esub.reshape(H, 1, B * Rc), self.J.reshape(H, B * Rc, m)).squeeze(1)
        elif self.kind == "rtrl":
            B, S, H, m = self.J.shape
            self.g_units += (eps.reshape(1, B * S) @ self.J.view(B * S, H * m)).view(H, m)
        else:
            coef = (eps * self.s_tilde).sum((1, 2))
            # one (1 x B) @ (B x Hm) product: einsum's permuting copies cost 8x more here
            self.g_units += (coef[None, :] @ self.theta_tilde.view(B, -1)).view_as(self.g_units)
        return s_new, loss

    #: SnAp-1 GRU keeps J = scale * J~ (scale per unit and example); outside this range the
    #: scale is folded into J~ (one extra pass) to keep J~ far from overflow and underflow.
    SCALE_RANGE = {torch.float32: (1e-12, 1e12), torch.float64: (1e-100, 1e100)}

    def _snap1_scaled_update(self, Dself: torch.Tensor, jac: Jacobian, x: torch.Tensor) -> None:
        """SnAp-1 for one-component units in one pass over J.

        ``J_t = D_t * J_{t-1} + I_t`` with a diagonal ``D_t`` is ``J_t = P_t * J~_t`` with
        ``P_t = D_t * P_{t-1}`` and ``J~_t = J~_{t-1} + I_t / P_t``: the multiply by D moves
        onto the small ``(H, B)`` scale, so each step reads and writes J~ once (the memory
        floor) plus one read for the gradient, instead of a multiply pass and an add pass.
        """
        lo, hi = self.SCALE_RANGE.get(self._opts["dtype"], (1e-12, 1e12))
        scale = self.scale * Dself
        size = scale.abs()
        if not bool(((size >= lo) & (size <= hi)).all()):
            self.J.mul_(scale)  # fold: J~ becomes D_t J_{t-1} itself
            scale = torch.ones_like(scale)
        self.scale = scale
        self._add_immediate(self.J, jac, x, scale)

    def _uoro_step(self, jac: Jacobian, U: torch.Tensor, x: torch.Tensor) -> None:
        B, H, c = self.batch, self.model.hidden, self.model.components
        noise = torch.randint(0, 2, (B, H, c), generator=self.generator).to(**self._opts) * 2 - 1
        ds = self.model.apply_D(jac, U, self.s_tilde)
        ni = self._noise_immediate(noise, jac, x)
        tiny = 1e-7 if self._opts["dtype"] == torch.float32 else 1e-16
        # rho0, rho1 balance the two factors' norms (variance reduction); they are even in the
        # noise, so the cross terms still vanish in expectation and the estimate is unbiased.
        rho0 = torch.sqrt((self.theta_tilde.flatten(1).norm(dim=1) + tiny) / (ds.flatten(1).norm(dim=1) + tiny))
        rho1 = torch.sqrt((ni.flatten(1).norm(dim=1) + tiny) / (noise.flatten(1).norm(dim=1) + tiny))
        self.s_tilde = rho0[:, None, None] * ds + rho1[:, None, None] * noise
        self.theta_tilde.mul_((1 / rho0)[:, None, None]).add_(ni.mul_((1 / rho1)[:, None, None]))
