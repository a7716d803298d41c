"""The gradient of a sequence loss by any method: truncated BPTT (autograd) or an online one.

:func:`sequence_gradient` is the one public entry point the correctness tests use: the
parameters are held fixed over the whole sequence, so every exact method must agree with
autograd through the unrolled sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.snap.cells import SparseRNN
from trainers.snap.influence import Online, parse_method

__all__ = ["bptt_window", "default_weights", "sequence_gradient"]


def default_weights(targets: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Loss weights ``(T, B)``: the mean over every target that is not ignored (``< 0``)."""
    valid = (targets >= 0).to(dtype)
    return valid / valid.sum().clamp(min=1.0)


def bptt_window(model: SparseRNN, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unroll one window with autograd: returns ``(weighted loss in nats, final state)``.

    The caller detaches ``state`` at the window start (truncation) and calls ``backward``.
    """
    W, U = model.effective()
    loss = inputs.new_zeros(())
    s = state
    for t in range(inputs.shape[0]):
        s = model.step(inputs[t], s, (W, U))
        if bool((weights[t] != 0).any()):
            ce = F.cross_entropy(model.logits(s), targets[t].clamp(min=0), reduction="none")
            loss = loss + (ce * weights[t]).sum()
    return loss, s


def sequence_gradient(model: SparseRNN, inputs: torch.Tensor, targets: torch.Tensor, method: str, *,
                      weights: torch.Tensor | None = None, window: int | None = None,
                      state: torch.Tensor | None = None,
                      generator: torch.Generator | None = None,
                      pattern: str = "jacobian") -> dict[str, torch.Tensor]:
    """Gradient of ``sum_t sum_b weights[t, b] * CE(step t)`` w.r.t. every parameter of ``model``.

    ``inputs (T, B, I)`` (e.g. one-hot), ``targets (T, B)`` class ids (``< 0``: no loss);
    ``weights`` defaults to :func:`default_weights`. ``method``: ``bptt``, ``rtrl``,
    ``snapN`` or ``uoro`` (random signs from ``generator``). With ``window = k`` the sequence
    is cut every ``k`` steps: BPTT truncates its backward pass there, the online methods reset
    their influence; the state itself is carried across. Returns ``{name: gradient}`` shaped
    like ``model.named_parameters()``. ``pattern``: SnAp's kept entries (``jacobian`` or
    ``unit``, see :mod:`trainers.snap.influence`).
    """
    kind, _ = parse_method(method)
    T, B = targets.shape
    if weights is None:
        weights = default_weights(targets, inputs.dtype)
    window = window or T
    s = model.initial_state(B) if state is None else state
    if kind == "bptt":
        params = dict(model.named_parameters())
        total = {name: torch.zeros_like(p) for name, p in params.items()}
        for start in range(0, T, window):
            sl = slice(start, start + window)
            loss, s = bptt_window(model, inputs[sl], targets[sl], weights[sl], s.detach())
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), grads):
                if g is not None:
                    total[name] += g
        return total
    online = Online(model, method, B, generator, pattern=pattern)
    weights_eff = model.effective()
    with torch.no_grad():
        for t in range(T):
            if t % window == 0:
                online.reset_influence()
            s, _ = online.step(inputs[t], s, targets[t], weights[t], weights_eff,
                               has_loss=bool((weights[t] != 0).any()))
    return online.gradients()
