"""Local adaptation: every query adapts its own copy of the output network, in one batch.

For a query with neighbours (h_k, v_k, w_k), T steps from theta on

    L(theta_x) = sum_k w_k NLL(g_{theta_x}(h_k), v_k) + (beta / 2) ||theta_x - theta||^2

with plain SGD or RMSprop at the local learning rate alpha, then predict g_{theta_x}(q).
``theta`` itself is never modified: the steps are pure functions of tensors, batched over
queries with ``torch.func.vmap`` (each query's parameters are a batch slice), and the grad is
``torch.func.grad`` of the per-query loss. :func:`adapt_predict_loop` is the same computation
as a Python loop with ``torch.optim`` on a copy per query: the reference for tests and the
baseline for the benchmark.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

__all__ = ["adapt_predict", "adapt_predict_loop", "linear_fn"]

Params = dict[str, torch.Tensor]
Fn = Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]


def linear_fn(params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """g(h) = h W^T + b: the output layer (or the LM softmax layer) as a pure function."""
    return x @ params["weight"].T + params["bias"]


def _adapt_one(fn: Fn, theta: Params, nb_x: torch.Tensor, nb_y: torch.Tensor, nb_w: torch.Tensor,
               query: torch.Tensor, steps: int, lr: float, beta: float, optimizer: str,
               decay: float, eps: float) -> torch.Tensor:
    def loss(p: Params) -> torch.Tensor:
        nll = F.cross_entropy(fn(p, nb_x), nb_y, reduction="none")
        reg = sum(((p[n] - theta[n]) ** 2).sum() for n in p)
        return (nb_w * nll).sum() + 0.5 * beta * reg

    p = dict(theta)
    sq = {n: torch.zeros_like(t) for n, t in theta.items()}
    for _ in range(steps):
        g = grad(loss)(p)
        if optimizer == "sgd":
            p = {n: p[n] - lr * g[n] for n in p}
        else:  # RMSprop, the update of torch.optim.RMSprop (centered=False, momentum=0)
            sq = {n: decay * sq[n] + (1.0 - decay) * g[n] * g[n] for n in p}
            p = {n: p[n] - lr * g[n] / (sq[n].sqrt() + eps) for n in p}
    return fn(p, query[None])[0]


def adapt_predict(fn: Fn, theta: Mapping[str, torch.Tensor], nb_x: torch.Tensor, nb_y: torch.Tensor,
                  nb_w: torch.Tensor, queries: torch.Tensor, *, steps: int, lr: float, beta: float = 0.0,
                  optimizer: str = "sgd", decay: float = 0.9, eps: float = 1e-6,
                  chunk: int | None = None) -> torch.Tensor:
    """Adapted logits for a batch of queries, adapted all at once.

    ``fn(params, x)`` is the output network; ``theta`` its parameters (left untouched);
    ``nb_x`` (B, K, D) the neighbours' keys, ``nb_y`` (B, K) their labels, ``nb_w`` (B, K)
    their weights, ``queries`` (B, D). ``chunk`` bounds how many per-query parameter copies
    exist at once. With ``steps == 0`` or ``lr == 0`` the unadapted prediction is returned as
    is (bit-for-bit the base model's output).
    """
    if optimizer not in ("sgd", "rmsprop"):
        raise ValueError(f"optimizer must be 'sgd' or 'rmsprop', got {optimizer!r}")
    theta = {n: t.detach() for n, t in theta.items()}
    if steps == 0 or lr == 0.0:
        return fn(theta, queries)
    one = vmap(lambda x, y, w, q: _adapt_one(fn, theta, x, y, w, q, steps, lr, beta, optimizer, decay, eps))
    chunk = chunk or queries.shape[0]
    outs = [one(nb_x[i:i + chunk], nb_y[i:i + chunk], nb_w[i:i + chunk], queries[i:i + chunk])
            for i in range(0, queries.shape[0], chunk)]
    return torch.cat(outs)


def adapt_predict_loop(module: torch.nn.Module, nb_x: torch.Tensor, nb_y: torch.Tensor,
                       nb_w: torch.Tensor, queries: torch.Tensor, *, steps: int, lr: float,
                       beta: float = 0.0, optimizer: str = "sgd", decay: float = 0.9,
                       eps: float = 1e-6) -> torch.Tensor:
    """The reference: one query at a time, autograd and ``torch.optim`` on a fresh copy."""
    theta = {n: p.detach().clone() for n, p in module.named_parameters()}
    outs = []
    for b in range(queries.shape[0]):
        params = {n: torch.nn.Parameter(t.clone()) for n, t in theta.items()}
        if optimizer == "sgd":
            opt = torch.optim.SGD(params.values(), lr=lr)
        else:
            opt = torch.optim.RMSprop(params.values(), lr=lr, alpha=decay, eps=eps)
        for _ in range(steps):
            opt.zero_grad()
            logits = torch.func.functional_call(module, params, (nb_x[b],))
            loss = (nb_w[b] * F.cross_entropy(logits, nb_y[b], reduction="none")).sum()
            loss = loss + 0.5 * beta * sum(((params[n] - theta[n]) ** 2).sum() for n in params)
            loss.backward()
            opt.step()
        with torch.no_grad():
            outs.append(torch.func.functional_call(module, params, (queries[b:b + 1],))[0])
    return torch.stack(outs)
