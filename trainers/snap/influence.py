"""Online gradients: RTRL, SnAp-n and UORO, all carrying an influence forward in time.

RTRL keeps the influence ``J_t = ds_t/dtheta`` exactly: ``J_t = I_t + D_t J_{t-1}`` with
``I_t`` the immediate Jacobian and ``D_t = ds_t/ds_{t-1}``; the gradient is
``sum_t (dL_t/ds_t) J_t``. Only the recurrent cell's parameters need an influence; the
read-out's gradient is immediate.

Influence layout. Parameters are grouped by the unit ``u`` they feed: ``m`` of them per unit
(``G * (nW + nU + 1)``: the kept entries of row ``u`` of every gate's ``W`` and ``U``, and
the bias), the same ``m`` for every unit (see :func:`trainers.snap.cells.row_pattern`),
ordered per gate as ``[W columns | bias | U columns]``: the immediate influence of all of
them is ``(d s'/d preactivation) x [x, 1, h]`` at the kept columns, an outer product.

Sparse networks never form a dense masked product: the forward pre-activations are CSR
products over the kept weights, and the inputs of the kept weights are gathered by column
index for the immediate Jacobian.

- SnAp-1 keeps, for a parameter of unit u, only the influence on unit u's own state; see
  :mod:`trainers.snap.snap1` (storage ``(c, B, H, G, nP)`` in two contiguous parts, the
  GRU's ``scale * J~`` trick, the compiled LSTM update). On CPU its whole step runs as the C
  loops of :mod:`trainers.snap.native` (the read-out first, so that ``dL_t/ds_t`` joins the
  influence update: one pass over J a step), except on a dense GRU.
- SnAp-n (n >= 2) keeps the influence on the units reachable from u within ``n - 1`` steps
  of the recurrent graph (from the sparsity masks, never from values that happen to be
  zero): ``J (H, B, R * c, m)``, R the largest reach (padded with an all-zero dummy unit):
  sparse storage, of size |theta| x reach rather than |theta| x H. Its update is one batched
  product with the ``(R c) x (R c)`` sub-blocks of ``D``.
- The pattern (``pattern``): ``jacobian`` (the default, as the authors' code) keeps, per state
  component, exactly the entries that are structurally nonzero after n steps of the core:
  ``P_1`` = the pattern of the immediate Jacobian, ``P_n = P_1 | struct(D) P_{n-1}``. An LSTM's
  output gate does not touch its unit's cell state within a step, so SnAp-1 drops the (c_u,
  output-gate parameter of u) entries, and SnAp-n drops the cell states reached only through
  an output gate. ``unit`` keeps every state component of every reached unit (a superset).
  The GRU has one component: the two coincide. SnAp-1 drops its entries in
  :mod:`trainers.snap.snap1` (the C loops too); SnAp-n multiplies J by the kept pattern after
  every step (:func:`pattern_keep`).
- RTRL keeps everything: ``J (B, S, H, m)``, ``S = H * c``; one batched ``D @ J`` a step.
- UORO (Tallec & Ollivier, 2017) keeps a rank-one estimate ``s~ theta~^T`` of J, per example,
  refreshed with random signs; its gradient estimate is unbiased.
"""

from __future__ import annotations

import warnings

import torch

from trainers.snap import native
from trainers.snap.cells import Jacobian, SparseRNN
from trainers.snap.config import parse_method
from trainers.snap.snap1 import Snap1, native_library

__all__ = ["IMMEDIATE", "PATTERNS", "Online", "parse_method", "pattern_keep", "reach_rows"]

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


#: SnAp's sparsity patterns (see the module docstring)
PATTERNS = ("jacobian", "unit")
#: structurally nonzero ``d s'[u, k] / d preactivation[u, gate]`` (component x gate), and of the
#: own-unit block ``E`` (component x component): the LSTM's output gate never reaches c
IMMEDIATE = {"gru": ((1, 1, 1),), "lstm": ((1, 1, 1, 1), (1, 1, 1, 0))}
OWN_BLOCK = {"gru": ((1,),), "lstm": ((0, 1), (0, 1))}


def pattern_keep(model: SparseRNN, n: int) -> torch.Tensor:
    """The ``jacobian`` pattern of SnAp-n from the masks (never from values): ``P (S, H, G)``,
    ``P[u' * c + k, u, g]``: the state component (u', k) keeps the influence of the parameters
    of unit u, gate g. ``P_1`` is the immediate Jacobian's pattern, ``P_n = P_1 | D P_{n-1}``
    with D's structure: E on the own unit, the recurrent products into the h columns."""
    H, c, G = model.hidden, model.components, model.gates
    imm = torch.tensor(IMMEDIATE[model.cell], dtype=torch.float64)  # (c, G)
    mask_u = (model.mask_u.detach().cpu() != 0).to(torch.float64)  # (G, i, j)
    D = torch.zeros(H, c, H, c, dtype=torch.float64)
    D[..., 0] = torch.einsum("kg,gij->ikj", imm, mask_u)
    D += torch.einsum("ij,kl->ikjl", torch.eye(H, dtype=torch.float64),
                      torch.tensor(OWN_BLOCK[model.cell], dtype=torch.float64))
    D = (D.reshape(H * c, H * c) > 0).to(torch.float64)
    P1 = torch.einsum("iu,kg->ikug", torch.eye(H, dtype=torch.float64), imm).reshape(H * c, H, G)
    P = P1.clone()
    for _ in range(n - 1):
        grown = ((P1 + (D @ P.reshape(H * c, H * G)).reshape_as(P)) > 0).to(torch.float64)
        if torch.equal(grown, P):
            break
        P = grown
    return P > 0


class Online:
    """Carries an influence and accumulates the gradient of a sequence loss, one step at a time.

    ``step(x, s, target, weight)`` advances the state and returns ``(s_new, loss)``; the
    gradient so far is in :meth:`gradients` (dense, shaped like the model's parameters).
    ``reset_influence()`` forgets the past (a truncation point); ``zero_grad()`` starts a new
    accumulation (after a parameter update). Everything runs under ``torch.no_grad``.
    """

    def __init__(self, model: SparseRNN, method: str, batch: int, generator: torch.Generator | None = None,
                 pattern: str = "jacobian") -> None:
        self.model, self.method, self.batch = model, method, batch
        self.kind, self.order = parse_method(method)
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
        self.pattern = pattern
        if self.kind == "bptt":
            raise ValueError("bptt is not an online method; use trainers.snap.gradients.bptt_window")
        self.generator = generator
        p = model.W
        H, c = model.hidden, model.components
        self.G, self.nW, self.nU = model.gates, model.cols_w.shape[-1], model.cols_u.shape[-1]
        self.m = model.per_unit
        self.n = self.nW + self.nU + 1  # per unit and gate: [W columns | bias | U columns]
        self._opts = dict(dtype=p.dtype, device=p.device)
        self.cols_w = model.cols_w.permute(1, 0, 2)  # (H, G, nW)
        self.cols_u = model.cols_u.permute(1, 0, 2)
        # Sparse networks never touch the masked weights: the forward pre-activations are CSR
        # products over the kept weights (structure below), and each kept weight's input is
        # gathered from [x, 1, h] by column index for the immediate Jacobian.
        self.dense = model.dense_w and model.dense_u
        I = model.inputs
        bias = torch.full((H, self.G, 1), I, dtype=torch.long, device=p.device)
        # into [x, 1, h]: part A (W columns and bias), part B (U columns), each (H G nP)
        self.cols = (torch.cat([self.cols_w, bias], -1).reshape(-1), (self.cols_u + I + 1).reshape(-1))
        self.cols_h = self.cols_u.reshape(-1)  # part B's columns of h alone (SnAp-1)
        self._buffers: dict = {}  # work buffers and cached CSR values, kept across steps
        nnz = (self.nW + 1, self.nU)  # per row of the CSR forms of [W | b] (on [x, 1]) and U
        cols_a = torch.cat([model.cols_w, torch.full((self.G, H, 1), I, dtype=torch.long, device=p.device)], -1)
        self._csr = [(torch.arange(0, self.G * H * k + 1, k, device=p.device), cols.reshape(-1), size)
                     for k, cols, size in zip(nnz, (cols_a, model.cols_u), (I + 1, H))]
        self.snap1, self._native, self.keep = None, None, None
        jacobian = self.kind == "snap" and pattern == "jacobian"
        if self.kind == "snap" and self.order == 1:
            # the own unit's (component, gate) entries that the pattern drops (LSTM: (c, o))
            drop = [] if not jacobian else [(k, g) for k, row in enumerate(IMMEDIATE[model.cell])
                                            for g, kept in enumerate(row) if not kept]
            self.snap1 = Snap1(batch, H, self.G, c, self.nW + 1, self.nU, self._opts, dense=self.dense, drop=drop)
            self._native = native_library(self._opts)  # the forward step in C (the influence: Snap1)
        if self.kind == "snap" and self.order >= 2:
            rows = reach_rows(model.recurrent_adjacency(), self.order)  # (H, R)
            self.state_rows = (rows[..., None] * c + torch.arange(c)).flatten(1).to(p.device)  # (H, R c)
            if jacobian:  # the unit pattern's rows hold the jacobian pattern: mask within them
                P = torch.nn.functional.pad(pattern_keep(model, self.order), (0, 0, 0, 0, 0, c))  # dummy rows
                idx = self.state_rows.cpu()
                keep = P[idx, torch.arange(H)[:, None]]  # (H, R c, G)
                if not bool(keep.all()):
                    keep = keep[..., None].expand(H, idx.shape[1], self.G, self.n).reshape(H, 1, idx.shape[1], self.m)
                    self.keep = keep.to(**self._opts)
        self.reset_influence()
        self.zero_grad()

    # -- bookkeeping ---------------------------------------------------------------------
    def reset_influence(self) -> None:
        B, H, c, m = self.batch, self.model.hidden, self.model.components, self.m
        if self.snap1 is not None:
            self.snap1.reset()
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
        if self.snap1 is not None:
            self.snap1.zero_grad()
        self.g_out_w = torch.zeros_like(model.out_w)
        self.g_out_b = torch.zeros_like(model.out_b)

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue an interrupted sequence."""
        if self.kind == "uoro":
            return {"s_tilde": self.s_tilde, "theta_tilde": self.theta_tilde}
        return {"J": self.influence()}

    def load_state_dict(self, state: dict) -> None:
        if self.snap1 is not None:
            self.snap1.load(state["J"])
            return
        for key, value in state.items():
            setattr(self, key, value.to(self._opts["device"]))

    @property
    def J(self) -> torch.Tensor:
        """The influence as stored (SnAp-1: flat, see :mod:`trainers.snap.snap1`)."""
        return self.snap1.J if self.snap1 is not None else self._J

    @J.setter
    def J(self, value: torch.Tensor) -> None:
        self._J = value

    def influence(self) -> torch.Tensor:
        """The influence as stored by the method (SnAp-1 GRU: with its scale applied)."""
        return self.snap1.influence() if self.snap1 is not None else self.J

    def gradients(self) -> dict[str, torch.Tensor]:
        """The accumulated gradient, dense and named like ``model.named_parameters()``."""
        G, H, nW = self.G, self.model.hidden, self.nW
        g = self.g_units.view(H, G, self.n) if self.snap1 is None else self.snap1.gradient_units()
        gw = g[..., :nW].permute(1, 0, 2)
        gu = g[..., nW + 1:].permute(1, 0, 2)
        W = torch.zeros_like(self.model.W).scatter_(2, self.model.cols_w, gw)
        U = torch.zeros_like(self.model.U).scatter_(2, self.model.cols_u, gu)
        return {"W": W, "U": U, "b": g[..., nW].T.clone(),
                "out_w": self.g_out_w.clone(), "out_b": self.g_out_b.clone()}

    # -- immediate Jacobian --------------------------------------------------------------
    def _inputs(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs multiplying each kept parameter: part A ``[W columns | bias]`` and part B
        ``U columns``, ``(B, H | 1, G | 1, nP)`` each (1: broadcast).

        A dense network broadcasts ``[x, 1]`` and ``h``; a sparse one gathers them by column
        index (``index_select`` into buffers kept across steps: a fresh large tensor each step
        costs page faults), and never forms a dense masked product.
        """
        B = x.shape[0]
        if self.dense:  # h is a strided view of the state: contiguous keeps the updates vectorised
            return torch.cat([x, x.new_ones(B, 1)], 1)[:, None, None, :], h.contiguous()[:, None, None, :]
        xh = torch.cat([x, x.new_ones(B, 1), h], 1)
        out = []
        for name, cols, n in (("A", self.cols[0], self.nW + 1), ("B", self.cols[1], self.nU)):
            buf = self._buffers.get(name)
            if buf is None or buf.shape[0] != B or buf.dtype != xh.dtype:
                buf = self._buffers[name] = torch.empty(B, cols.numel(), dtype=xh.dtype, device=xh.device)
            out.append(torch.index_select(xh, 1, cols, out=buf).view(B, self.model.hidden, self.G, n))
        return out[0], out[1]

    def _kept_weights(self, W: torch.Tensor, U: torch.Tensor):
        """``((CSR values of [W | b], of U), diagonals of U (H, G))``, gathered again only after
        the parameters change."""
        model = self.model
        cached = self._buffers.get("kept")
        key = (W, U, model.b, W._version, U._version, model.b._version)
        if cached is None or any(a is not b if isinstance(a, torch.Tensor) else a != b
                                 for a, b in zip(cached[0], key)):
            values = (torch.cat([W.gather(2, model.cols_w), model.b.unsqueeze(-1)], -1).reshape(-1),
                      U.gather(2, model.cols_u).reshape(-1))
            udiag = U.diagonal(dim1=1, dim2=2).T.contiguous()
            self._buffers["kept"] = cached = (key, (values, udiag))
        return cached[1]

    def _sparse_preacts(self, x: torch.Tensor, h: torch.Tensor, W: torch.Tensor, U: torch.Tensor):
        """``(W x + b, U h)`` as ``(B, G, H)`` each: CSR products over the kept weights only.

        Rows are (gate, unit), each with its ``nW`` (+ the bias, on a constant-1 input column)
        or ``nU`` kept columns; the values are gathered from the parameters each step (they
        change with every update), the structure is fixed.
        """
        model, B = self.model, x.shape[0]
        G, H = self.G, model.hidden
        values = self._kept_weights(W, U)[0]
        inputs = (torch.cat([x, x.new_ones(B, 1)], 1), h)
        out = []
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            for (crow, col, size), w, v in zip(self._csr, values, inputs):
                csr = torch.sparse_csr_tensor(crow, col, w, (G * H, size))
                out.append((csr @ v.T).T.reshape(B, G, H))
        return out[0], out[1]

    def _add_immediate(self, J: torch.Tensor, jac: Jacobian, V: torch.Tensor,
                       scale: torch.Tensor | None = None) -> None:
        """``J += I_t / scale`` in place, for ``J`` viewed as ``(H, B, c, m)`` (own-unit rows).

        The immediate Jacobian is an outer product per unit: ``dW[b, u, k, g] * V[b, u, g, :]``
        (``dU`` on the U columns), so the whole update is one broadcast ``addcmul_`` (two for
        the GRU, whose candidate gate scales its U columns by the reset gate).
        """
        nA = self.nW + 1
        Jv = J.unflatten(-1, (self.G, self.n))
        for sl, d, v in ((slice(0, nA), jac.dW, V[0]), (slice(nA, None), jac.dU, V[1])):
            d = d.transpose(0, 1)  # (H, B, c, G)
            if scale is not None:
                d = d / scale
            Jv[..., sl].addcmul_(d.unsqueeze(-1), v.transpose(0, 1).unsqueeze(2))

    def _noise_immediate(self, nu: torch.Tensor, jac: Jacobian, V: torch.Tensor) -> torch.Tensor:
        """``nu^T I_t`` per example, example-major and contiguous: ``(B, H, m)``."""
        B, H, nA = self.batch, self.model.hidden, self.nW + 1
        a = torch.einsum("buk,bukg->bug", nu, jac.dW).unsqueeze(-1)  # (B, H, G, 1)
        b = a if jac.dU is jac.dW else torch.einsum("buk,bukg->bug", nu, jac.dU).unsqueeze(-1)
        out = torch.empty(B, H, self.G, self.n, **self._opts)
        torch.mul(a, V[0], out=out[..., :nA])
        torch.mul(b, V[1], out=out[..., nA:])
        return out.view(B, H, self.m)

    # -- one step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, x: torch.Tensor, s: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
             weights: tuple[torch.Tensor, torch.Tensor] | None = None, has_loss: bool = True):
        """Advance one step: returns ``(s_new, loss)``; accumulates the gradient of the loss."""
        model = self.model
        W, U = weights if weights is not None else model.effective()
        if self._native is not None:
            return self._snap1_native_step(x, s, target, weight, W, U, has_loss)
        V = None if self.snap1 is not None else self._inputs(x, s[..., 0])
        preacts = None if self.dense else self._sparse_preacts(x, s[..., 0], W, U)
        s_new, jac = model.step_jacobian(x, s, (W, U), preacts=preacts)
        c = model.components
        if self.snap1 is not None:
            return self._snap1_step(x, s, s_new, jac, U, target, weight, has_loss)
        if self.kind == "snap":
            D = torch.nn.functional.pad(model.full_D(jac, U), (0, c, 0, c))
            idx = self.state_rows
            Dsub = D[:, idx[:, :, None], idx[:, None, :]].transpose(0, 1)  # (H, B, Rc, Rc)
            self.J = Dsub @ self.J
            self._add_immediate(self.J[:, :, :c], jac, V)
            if self.keep is not None:
                self.J.mul_(self.keep)
        elif self.kind == "rtrl":
            B, S, H, m = self.J.shape
            self.J = torch.bmm(model.full_D(jac, U), self.J.view(B, S, H * m)).view(B, S, H, m)
            own = self.J.view(B, H, c, H, m).diagonal(dim1=1, dim2=3).permute(3, 0, 1, 2)
            self._add_immediate(own, jac, V)
        else:
            self._uoro_step(jac, U, V)
        if not has_loss:
            return s_new, torch.zeros((), **self._opts)
        loss, g_ow, g_ob, eps = model.readout_grad(s_new, target, weight)
        self.g_out_w += g_ow
        self.g_out_b += g_ob
        B = self.batch
        if self.kind == "snap":
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

    def _snap1_step(self, x, s, s_new, jac, U, target, weight, has_loss):
        """SnAp-1: the read-out first, so that its ``dL/ds`` joins the influence update."""
        B = x.shape[0]
        eps, loss = None, torch.zeros((), **self._opts)
        if has_loss:
            loss, g_ow, g_ob, eps = self.model.readout_grad(s_new, target, weight)
            self.g_out_w += g_ow
            self.g_out_b += g_ob
        sources = ((torch.cat([x, x.new_ones(B, 1)], 1), None if self.dense else self.cols[0]),
                   (s[..., 0].contiguous(), None if self.dense else self.cols_h))
        self.snap1.step(jac, U.diagonal(dim1=1, dim2=2), sources, eps)
        return s_new, loss

    def _snap1_native_step(self, x, s, target, weight, W, U, has_loss):
        """SnAp-1 on CPU with the C loops of :mod:`trainers.snap.native`: the forward step and
        its Jacobian in one call (after the CSR products, on a sparse network), the read-out,
        then the influence update with the read-out's ``dL/ds``, a handful of calls a step
        (the dense GRU: its eager delayed update, see :mod:`trainers.snap.snap1`)."""
        model, lib = self.model, self._native
        B, I, H, G, c = x.shape[0], model.inputs, model.hidden, self.G, model.components
        buf = self._buffers.get("native")
        if buf is None or buf["xT"].shape[1] != B:
            new = lambda *shape: torch.empty(*shape, **self._opts)  # noqa: E731
            buf = self._buffers["native"] = dict(
                xT=new(I + 1, B), hT=new(H, B), aw=new(G * H, B), au=new(G * H, B),
                act=new(B, G, H), mA=new(B, H, c, G), mB=new(B, H, c, G), E=new(B, H, c, c),
                cols=[cols.to(torch.int32) for _, cols, _ in self._csr])
            buf["xT"][I] = 1.0
        xT, hT = buf["xT"], buf["hT"]
        s = s.contiguous()
        xT[:I].copy_(x.T)
        hT.copy_(s[..., 0].T)
        values, udiag = self._kept_weights(W, U)
        if self.dense:
            aw = torch.addmm(model.b.view(1, -1), x, W.reshape(G * H, I).T).view(B, G, H)
            au = (s[..., 0] @ U.reshape(G * H, H).T).view(B, G, H)
        else:
            native.csr(lib, values[0], buf["cols"][0], xT, buf["aw"])
            native.csr(lib, values[1], buf["cols"][1], hT, buf["au"])
            aw, au = buf["aw"].T.view(B, G, H), buf["au"].T.view(B, G, H)
        # the gates' nonlinearities as a few vectorised torch operations, the rest in C
        act, s_new = buf["act"], torch.empty(B, H, c, **self._opts)
        if model.cell == "gru":
            torch.add(aw[:, :2], au[:, :2], out=act[:, :2]).sigmoid_()  # z, r
            torch.addcmul(aw[:, 2], act[:, 1], au[:, 2], out=act[:, 2]).tanh_()  # n
            native.cell(lib, False, act, au[:, 2], None, None, s, s_new, buf["mA"], buf["mB"], buf["E"])
        else:
            torch.add(aw, au, out=act)
            g = act[:, 2].tanh()
            act.sigmoid_()[:, 2] = g  # i, f, g, o
            cn = torch.addcmul(act[:, 1] * s[..., 1], act[:, 0], g)
            native.cell(lib, True, act, None, cn, cn.tanh(), s, s_new, buf["mA"], buf["mB"], buf["E"])
        eps, loss = None, torch.zeros((), **self._opts)
        if has_loss:  # dL/dh only: the read-out does not see the LSTM's cell state
            loss, eps = model.readout_accumulate(s_new[..., 0], target, weight, self.g_out_w, self.g_out_b)
        cols = (None, None) if self.dense else (self.cols[0], self.cols_h)
        if self.snap1.native is not None:
            self.snap1.native_step(buf["E"], buf["mA"], buf["mB"], udiag, xT, cols[0], hT, cols[1], eps)
            return s_new, loss
        # the dense GRU's delayed updates (eager; they keep the sources: fresh tensors)
        jac = Jacobian(buf["mA"], buf["mB"], buf["E"], s[..., 0])
        sources = ((torch.cat([x, x.new_ones(B, 1)], 1), cols[0]), (s[..., 0].contiguous(), cols[1]))
        self.snap1.step(jac, udiag.T, sources, None if eps is None else eps.unsqueeze(-1))
        return s_new, loss

    def _uoro_step(self, jac: Jacobian, U: torch.Tensor, V: torch.Tensor) -> None:
        B, H, c = self.batch, self.model.hidden, self.model.components
        noise = torch.randint(0, 2, (B, H, c), generator=self.generator).to(**self._opts) * 2 - 1
        ds = self.model.apply_D(jac, U, self.s_tilde)
        ni = self._noise_immediate(noise, jac, V)
        tiny = 1e-7 if self._opts["dtype"] == torch.float32 else 1e-16
        # rho0, rho1 balance the two factors' norms (variance reduction); they are even in the
        # noise, so the cross terms still vanish in expectation and the estimate is unbiased.
        rho0 = torch.sqrt((self.theta_tilde.flatten(1).norm(dim=1) + tiny) / (ds.flatten(1).norm(dim=1) + tiny))
        rho1 = torch.sqrt((ni.flatten(1).norm(dim=1) + tiny) / (noise.flatten(1).norm(dim=1) + tiny))
        self.s_tilde = rho0[:, None, None] * ds + rho1[:, None, None] * noise
        self.theta_tilde.mul_((1 / rho0)[:, None, None]).add_(ni.mul_((1 / rho1)[:, None, None]))
