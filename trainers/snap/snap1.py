"""SnAp-1's influence: one entry per (example, own-unit state component, kept parameter).

For a parameter feeding unit u, SnAp-1 keeps only its influence on u's own state, so the
update ``J <- D_uu J + I`` needs just the ``c x c`` diagonal blocks of ``D`` and costs
O(|theta|) a step: no dense J, no per-parameter loop, a few whole-tensor operations.

Storage. The parameters of unit u, gate g come in two parts: A = ``[W columns | bias]``
(``nA = nW + 1``, input ``[x, 1]``) and B = ``U columns`` (``nB = nU``, input ``h``). Each part
is a contiguous ``(c, batch, H, G, nP)`` view of one flat buffer ``J``:

- contiguous operands: PyTorch's CPU kernels run a broadcast ``addcmul_`` on a sliced
  (non-contiguous) tensor 2-3x slower than on a contiguous one, so the parts are never
  slices of one wider tensor;
- the split matches the immediate Jacobian: the GRU's candidate gate scales its U columns by
  the reset gate, so the two parts have different multipliers;
- batch before unit matches the layout the gathered inputs of a sparse network come in
  (``index_select`` along the columns of ``[x, 1, h]``), and a strided ``baddbmm_`` reads it
  for the gradient as fast as a contiguous one;
- state component outermost, so the LSTM's ``h`` and ``c`` rows are contiguous tensors too.

GRU (one component): ``J = scale * J~`` with a per-(example, unit) scale, so the multiply by
``D_uu`` moves onto the scale and each step is one ``addcmul_`` per part (one read and one
write of J~: the memory floor), plus one read for the gradient. On a dense GRU every unit's
immediate Jacobian is an outer product with the same ``[x, 1]`` and ``h``, so ``GRU_DELAY``
steps of them are kept as factors and added by one batched product, and their gradient
contribution is a matrix product too (see :meth:`Snap1.flush`): J~ is read and written once
per ``GRU_DELAY`` steps, below the one-pass-a-step floor.

LSTM (h and c): the 2 x 2 blocks mix the two rows. Eagerly that takes several in-place
passes; where ``torch.compile`` works (a C++ compiler on CPU, Triton on CUDA) and J is large,
one generated kernel per part does the whole update in one read and one write of J.

C loops (CPU, except the dense GRU; :mod:`trainers.snap.native`): J is stored unit-major,
``(c, H, G, nP, batch)`` per part, and one loop does the update, loads the inputs by column
index and adds the gradient of the new J in the same pass (:meth:`Snap1.native_step`): one
read and one write of J a step for every cell and sparsity. :meth:`Snap1.influence` and
:meth:`Snap1.load` use the layout above either way, so checkpoints move between the paths.
"""

from __future__ import annotations

import os
import warnings

import torch

from trainers.snap import native
from trainers.snap.cells import Jacobian

__all__ = ["COMPILE_MIN_ENTRIES", "GRU_DELAY", "NATIVE", "Snap1", "native_library"]

#: on CPU, run the step as the C loops of :mod:`trainers.snap.native` (update, gathered inputs
#: and gradient in one pass over J) where they compile; ``HPSWEEP_SNAP_COMPILE=0`` disables them
NATIVE = os.environ.get("HPSWEEP_SNAP_COMPILE", "1") != "0"
#: entries of J per extra thread for the C loops (smaller problems run on one thread)
NATIVE_ENTRIES_PER_THREAD = 1 << 18

#: use the compiled LSTM update from this many influence entries up (small problems, such as
#: the float64 tests, stay eager: compiling costs seconds); ``HPSWEEP_SNAP_COMPILE=0`` disables it
COMPILE_MIN_ENTRIES = 1 << 17
#: dense GRU: steps whose immediate Jacobians are kept as rank-one factors before being added
#: to J~ by one batched product (1: add every step)
GRU_DELAY = 8


def _lstm_update(Jh, Jc, d00, d01, d10, d11, dh, dc, V):
    """``[Jh; Jc] <- D [Jh; Jc] + [dh; dc] * V`` in place: one read and one write of J once
    compiled. (Gathering a sparse network's inputs inside the kernel, as indirect loads,
    measured slower than gathering them eagerly first.)"""
    h = Jh * d00 + Jc * d01 + dh * V
    c = Jh * d10 + Jc * d11 + dc * V
    Jh.copy_(h)
    Jc.copy_(c)


_compiled: dict = {}
_compile_failed = False


def _compiled_fn(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def native_library(opts: dict):
    """The C loops of :mod:`trainers.snap.native` for tensors made with ``opts`` (dtype,
    device), or None: off (``NATIVE``), not on CPU, not float32/64, or nothing compiles."""
    if (NATIVE and torch.device(opts.get("device", "cpu")).type == "cpu"
            and opts.get("dtype") in (torch.float32, torch.float64)):
        return native.library()
    return None


class Snap1:
    """SnAp-1 influence and gradient accumulator for ``H`` units, ``G`` gates, ``c`` components.

    ``update(jac, udiag, (V_A, V_B))`` advances the influence; ``accumulate(eps)`` adds
    ``sum_b eps_b J_b`` to the per-part gradients ``g_parts`` (``(H, G * nP)`` each).
    """

    #: GRU: J = scale * J~; outside this range the scale is folded into J~ (one extra pass),
    #: keeping J~ far from overflow and underflow
    SCALE_RANGE = {torch.float32: (1e-12, 1e12), torch.float64: (1e-100, 1e100)}

    def __init__(self, batch: int, hidden: int, gates: int, components: int, nA: int, nB: int,
                 opts: dict, dense: bool = False, drop: list[tuple[int, int]] | tuple = ()) -> None:
        self.B, self.H, self.G, self.c = batch, hidden, gates, components
        # (component, gate) entries of the own unit held at zero (the ``jacobian`` pattern: an
        # LSTM's output gate has no immediate influence on c); the C loops drop c rows only
        self.drop = [tuple(d) for d in drop]
        if any(k != 1 or components != 2 or not 0 <= g < gates for k, g in self.drop):
            raise ValueError(f"Snap1 drops c-row entries of an LSTM only, got drop={self.drop}")
        self.ckeep = sum(1 << g for g in range(gates) if (1, g) not in self.drop)
        self.sizes = (nA, nB)
        self.opts = opts
        # the GRU's eager update is one pass already (and measured faster than compiled
        # indirect loads on sparse networks): only the LSTM's 2 x 2 mixing is compiled
        self.compile = (components == 2 and os.environ.get("HPSWEEP_SNAP_COMPILE", "1") != "0"
                        and self.numel >= COMPILE_MIN_ENTRIES)
        self._buffers: dict[str, torch.Tensor] = {}
        # the C loops on CPU, except on a dense GRU: its delayed updates beat the one-pass floor
        self.native = None if components == 1 and dense and GRU_DELAY > 1 else native_library(opts)
        self.reset()
        self.zero_grad()

    @property
    def numel(self) -> int:
        return self.c * self.B * self.H * self.G * sum(self.sizes)

    # -- storage -------------------------------------------------------------------------
    def reset(self) -> None:
        if getattr(self, "_pending", None):
            self.flush()  # their gradient still counts; the influence itself is forgotten
        self._pending: list[list] = []
        self.J = torch.zeros(self.numel, **self.opts)
        self.scale = torch.ones(self.B, self.H, **self.opts) if self.c == 1 else None

    def zero_grad(self) -> None:
        self.flush()
        self.g_parts = [torch.zeros(self.H, self.G * n, **self.opts) for n in self.sizes]

    def parts(self) -> list[torch.Tensor]:
        """The two contiguous views of ``J``: ``(c, B, H, G, nP)``, or with the C loops
        ``(c, H, G, nP, B)`` (see :mod:`trainers.snap.native`)."""
        out, start = [], 0
        c, B, H, G = self.c, self.B, self.H, self.G
        for n in self.sizes:
            size = c * B * H * G * n
            shape = (c, H, G, n, B) if self.native is not None else (c, B, H, G, n)
            out.append(self.J[start:start + size].view(shape))
            start += size
        return out

    def influence(self) -> torch.Tensor:
        """``J`` (flat, parts A then B, each ``(c, B, H, G, nP)``) with the GRU's scale
        applied; a new tensor."""
        self.flush()
        if self.native is not None:
            return torch.cat([p.permute(0, 4, 1, 2, 3).flatten() for p in self.parts()])
        if self.scale is None:
            return self.J.clone()
        return torch.cat([(p * self.scale[None, :, :, None, None]).flatten() for p in self.parts()])

    def load(self, J: torch.Tensor) -> None:
        """Set the influence from :meth:`influence`'s layout."""
        self._pending = []
        self.J = J.to(**self.opts).clone()
        if self.native is not None:
            c, B, H, G, start = self.c, self.B, self.H, self.G, 0
            for part in self.parts():
                n, size = part.shape[3], part.numel()
                part.copy_(J[start:start + size].view(c, B, H, G, n).permute(0, 2, 3, 4, 1))
                start += size
        if self.scale is not None:
            self.scale = torch.ones_like(self.scale)

    # -- one step ------------------------------------------------------------------------
    def step(self, jac: Jacobian, udiag: torch.Tensor, sources, eps: torch.Tensor | None) -> None:
        """:meth:`update`, then :meth:`accumulate` ``eps`` (None: no loss at this step): the
        eager path. With the C loops the caller runs :meth:`native_step` instead."""
        if self.native is not None:
            raise RuntimeError("Snap1 with the C loops (unit-major J): call native_step")
        self.update(jac, udiag, sources)
        if eps is not None:
            self.accumulate(eps)

    def native_step(self, E: torch.Tensor, mA: torch.Tensor, mB: torch.Tensor, udiag: torch.Tensor,
                    srcA: torch.Tensor, colsA: torch.Tensor | None, srcB: torch.Tensor,
                    colsB: torch.Tensor | None, eps: torch.Tensor | None, epsc: torch.Tensor | None = None) -> None:
        """:meth:`step` as one C loop (:func:`trainers.snap.native.step`): the update and the
        gradient of ``J_t`` in one pass. Contiguous operands: ``E (B, H, c, c)``, ``mA = dW``,
        ``mB = dU (B, H, c, G)``, ``udiag (H, G)``, the sources transposed ``(columns, B)``;
        ``eps``, ``epsc`` the loss's gradient w.r.t. h and c, ``(B, H)`` (None: no loss;
        ``epsc`` None: zero)."""
        cols = [None if cl is None else self._int32(name, cl) for name, cl in (("A", colsA), ("B", colsB))]
        threads = max(1, min(torch.get_num_threads(), self.numel // NATIVE_ENTRIES_PER_THREAD))
        native.step(self.native, self.c, self.B, self.H, self.G, *self.sizes, *self.parts(), E, mA, mB, udiag,
                    srcA, cols[0], srcB, cols[1], eps, epsc, *self.g_parts, ckeep=self.ckeep, threads=threads)

    def _int32(self, name: str, cols: torch.Tensor) -> torch.Tensor:
        """``cols`` as int32 (the C loop's index type), converted once."""
        key = f"cols{name}"
        cached = self._buffers.get(key)
        if cached is None or cached[0] is not cols:
            self._buffers[key] = cached = (cols, cols.to(torch.int32).contiguous())
        return cached[1]

    def update(self, jac: Jacobian, udiag: torch.Tensor, sources) -> None:
        """``J <- D_uu J + I``; ``udiag (G, H)``: the recurrent matrices' diagonals.

        ``sources``: per part ``(src (B, S), cols)``: the part's inputs are ``src`` broadcast
        (``cols`` None: a dense network) or ``src[:, cols]`` viewed ``(B, H, G, nP)``.
        """
        D = jac.E.clone()  # (B, H, c, c)
        D[..., 0] += (jac.dU * udiag.T[:, None, :]).sum(-1)  # the own unit's recurrent weights
        mult = [jac.dW.permute(2, 0, 1, 3).unsqueeze(-1), jac.dU.permute(2, 0, 1, 3).unsqueeze(-1)]  # (c, B, H, G, 1)
        shapes = [(self.B, self.H, self.G, n) for n in self.sizes]
        if self.c == 1 and GRU_DELAY > 1 and all(cols is None for _, cols in sources):
            self._gru_delayed(D[..., 0, 0], jac, sources)
            return
        global _compile_failed
        done = 0  # parts updated by the compiled kernel (a failure can come on the second)
        if self.compile and not _compile_failed:
            d = [D[..., k, l, None, None] for k in range(2) for l in range(2)]  # (B, H, 1, 1)
            try:
                for part, m, (src, cols), shape, name in zip(self.parts(), mult, sources, shapes, "AB"):
                    V = self._inputs(name, src, cols, shape)
                    _compiled_fn(_lstm_update)(part[0], part[1], *d, m[0], m[1], V)
                    done += 1
                self._drop()
                return
            except Exception as err:  # no compiler, no Triton, ...: the eager path is exact too
                _compile_failed = True
                warnings.warn(f"SnAp-1: torch.compile unavailable ({type(err).__name__}: {err}); "
                              "using eager updates", RuntimeWarning, stacklevel=2)
        V = [self._inputs(name, src, cols, shape).unsqueeze(0)
             for name, (src, cols), shape in zip("AB", sources, shapes)]
        if self.c == 1:
            self._gru_update(D[..., 0, 0], mult, V)
        else:
            self._lstm_update(D, mult, V, skip=done)
            self._drop()

    def _drop(self) -> None:
        """Hold the dropped (component, gate) entries at zero (eager layout ``(c, B, H, G, nP)``)."""
        for k, g in self.drop:
            for part in self.parts():
                part[k, :, :, g].zero_()

    def _inputs(self, name: str, src: torch.Tensor, cols: torch.Tensor | None, shape) -> torch.Tensor:
        if cols is None:
            return src[:, None, None, :]
        # into a buffer kept across steps: a fresh large tensor each step costs page faults
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != src.dtype:
            buf = self._buffers[name] = torch.empty(self.B, cols.numel(), dtype=src.dtype, device=src.device)
        return torch.index_select(src, 1, cols, out=buf).view(shape)

    def _rescale(self, D: torch.Tensor) -> torch.Tensor:
        """GRU: ``P_t = D_t P_{t-1}``, folded into J~ when out of range; returns ``P_t``."""
        lo, hi = self.SCALE_RANGE.get(self.opts["dtype"], (1e-12, 1e12))
        scale = self.scale * D
        size = scale.abs()
        if not bool(((size >= lo) & (size <= hi)).all()):
            for part in self.parts():
                part.mul_(scale[None, :, :, None, None])  # fold: J~ becomes D_t J_{t-1} itself
            scale = torch.ones_like(scale)
        self.scale = scale
        return scale[None, :, :, None, None]

    def _gru_delayed(self, D: torch.Tensor, jac: Jacobian, sources) -> None:
        """Dense GRU: keep ``I_t / P_t`` as its factors ``(d s / d preactivation) / P_t`` and
        the inputs ``[x, 1]``, ``h``; every ``GRU_DELAY`` steps :meth:`flush` adds them all in
        one batched product, so J~ is read and written once per ``GRU_DELAY`` steps."""
        if len(self._pending) >= GRU_DELAY:
            self.flush()
        lo, hi = self.SCALE_RANGE.get(self.opts["dtype"], (1e-12, 1e12))
        scale = self.scale * D
        size = scale.abs()
        if not bool(((size >= lo) & (size <= hi)).all()):
            self.flush()
            for part in self.parts():
                part.mul_(scale[None, :, :, None, None])  # fold, as in _rescale
            scale = torch.ones_like(scale)
        self.scale = scale
        inv = scale[..., None]
        self._pending.append([jac.dW[:, :, 0] / inv, jac.dU[:, :, 0] / inv, sources[0][0], sources[1][0], None])

    def flush(self) -> None:
        """Add the pending steps (dense GRU) to J~ and their gradient to ``g_parts``.

        With ``J~_t = J~_0 + sum_{tau <= t} a_tau x V_tau`` and ``e_t = eps_t P_t``:
        ``sum_t e_t J~_t = (sum_t e_t) J~_0 + sum_tau (a_tau sum_{t >= tau} e_t) x V_tau``,
        one read of J~_0 and a matrix product; then one read and write of J~ for the update.
        """
        if not getattr(self, "_pending", None):
            return
        pending, self._pending = self._pending, []
        K, B, H, G = len(pending), self.B, self.H, self.G
        zero = torch.zeros(B, H, **self.opts)
        E = torch.stack([p[4] if p[4] is not None else zero for p in pending])  # (K, B, H)
        R = E.flip(0).cumsum(0).flip(0)  # sum_{t >= tau} e_t
        total = R[0].T.unsqueeze(1).contiguous()  # (H, 1, B)
        for i, (part, g, n) in enumerate(zip(self.parts(), self.g_parts, self.sizes)):
            a = torch.stack([p[i] for p in pending])  # (K, B, H, G)
            V = torch.stack([p[2 + i] for p in pending])  # (K, B, nP)
            J = part[0].view(B, H * G, n)
            g.unsqueeze(1).baddbmm_(total, part[0].flatten(2).transpose(0, 1))
            coef = (a * R[..., None]).permute(2, 3, 0, 1).reshape(H * G, K * B)
            g.view(H * G, n).addmm_(coef, V.reshape(K * B, n))
            J.baddbmm_(a.permute(1, 2, 3, 0).reshape(B, H * G, K), V.transpose(0, 1))

    def _gru_update(self, D: torch.Tensor, mult, V) -> None:
        """``J_t = P_t J~_t``, ``P_t = D_t P_{t-1}``, ``J~_t = J~_{t-1} + I_t / P_t``: one pass."""
        inv = self._rescale(D)
        for part, m, v in zip(self.parts(), mult, V):
            part.addcmul_(m / inv, v)

    def _lstm_update(self, D: torch.Tensor, mult, V, skip: int = 0) -> None:
        """Eager: the 2 x 2 mixing in place (a buffer for one product), then the immediate."""
        d = [D[..., k, l, None, None] for k in range(2) for l in range(2)]  # (B, H, 1, 1)
        for part, m, v in list(zip(self.parts(), mult, V))[skip:]:
            Jh, Jc = part[0], part[1]
            buf = self._buffers.get(f"mix{Jh.numel()}")
            if buf is None:
                buf = self._buffers[f"mix{Jh.numel()}"] = torch.empty_like(Jh)
            torch.mul(Jh, d[2], out=buf)
            Jh.mul_(d[0]).addcmul_(Jc, d[1])
            Jc.mul_(d[3]).add_(buf)
            part.addcmul_(m, v)

    def accumulate(self, eps: torch.Tensor) -> None:
        """``g += sum_b eps[b, u, k] J[k, b, u, :]`` for every unit u; ``eps (B, H, c)``."""
        if self._pending:  # a delayed step (dense GRU): its gradient is added at the flush
            self._pending[-1][4] = eps[..., 0] * self.scale
            return
        e = eps if self.scale is None else eps * self.scale[..., None]
        e = e.permute(1, 2, 0).reshape(self.H, 1, self.c * self.B)  # (H, 1, (k, b))
        for g, part in zip(self.g_parts, self.parts()):
            # (H, 1, c B) @ (H, c B, G nP), the right operand a strided view of J: no copy
            g.unsqueeze(1).baddbmm_(e, part.view(self.c * self.B, self.H, -1).transpose(0, 1))

    def gradient_units(self) -> torch.Tensor:
        """The accumulated gradient as ``(H, G, nA + nB)``: per gate ``[W cols | bias | U cols]``."""
        self.flush()
        return torch.cat([g.view(self.H, self.G, n) for g, n in zip(self.g_parts, self.sizes)], -1)
