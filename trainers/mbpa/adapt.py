"""Local adaptation: every query adapts its own copy of the output network, in one batch.

For a query with neighbours (h_k, v_k, w_k), T steps from theta on

    L(theta_x) = sum_k w_k NLL(g_{theta_x}(h_k), v_k) + (beta / 2) ||theta_x - theta||^2

with plain SGD or RMSprop at the local learning rate alpha, then predict g_{theta_x}(q).
``theta`` itself is never modified. Two batched implementations of the same computation:

- :func:`adapt_predict`, for any network ``g`` given as a pure function: the steps are
  ``torch.func.grad`` of the per-query loss, ``vmap``-ed over queries (each query's parameters
  are a batch slice);
- :func:`adapt_predict_mlp`, for a chain ``Linear (ReLU Linear)*`` (our MNIST MLP and its output
  layer, what the trainer adapts): gradients in closed form by batched matrix products, and
  for one SGD step no per-query copy at all (the neighbours' backward passes at theta are
  shared by every query; see :func:`_first_step_sgd`). bench/mbpa_adapt.py measures both.

:func:`adapt_predict_loop` is the same computation as a Python loop with ``torch.optim`` on a
copy per query: the reference for tests and the baseline for the benchmark.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

__all__ = ["adapt_predict", "adapt_predict_loop", "adapt_predict_mlp", "first_step_terms", "FirstStep", "linear_fn",
           "mlp_layers"]

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


# --- closed-form batched adaptation of a Linear/ReLU chain -----------------------------------

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def mlp_layers(module: torch.nn.Module) -> Layers:
    """The ``(weight, bias)`` of a network that is a chain ``Linear (ReLU Linear)*`` (detached).

    Our MNIST MLP (g = the whole network, pixel keys) and its output layer (hidden keys) both
    are; anything else raises ``ValueError`` and takes the generic :func:`adapt_predict`.
    """
    leaves = [m for m in module.modules() if not list(m.children())]
    kinds = ["linear" if isinstance(m, torch.nn.Linear) else "relu" if isinstance(m, torch.nn.ReLU) else "other"
             for m in leaves]
    if not kinds or kinds[::2] != ["linear"] * len(kinds[::2]) or kinds[1::2] != ["relu"] * len(kinds[1::2]) \
            or kinds[-1] != "linear" or any(m.bias is None for m in leaves[::2]):
        raise ValueError(f"not a Linear/ReLU chain with biases: {type(module).__name__} ({' '.join(kinds)})")
    return [(m.weight.detach(), m.bias.detach()) for m in leaves[::2]]


def _softmax_last(z: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis; for a handful of classes this is several times faster than
    ``torch.softmax`` (whose kernel vectorises along that short axis)."""
    e = (z - z.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


class FirstStep(NamedTuple):
    """Per example at theta (see :func:`first_step_terms`)."""

    inputs: list[torch.Tensor]       # every layer's input, (M, d_in); inputs[0] are the keys
    deltas: list[torch.Tensor]       # dNLL/dz of every layer's output, (M, d_out)
    sqnorms: torch.Tensor            # |key|^2, (M,)


def first_step_terms(layers: Layers, keys: torch.Tensor, labels: torch.Tensor) -> FirstStep:
    """Per example at theta: every layer's input and ``dNLL/dz`` of every layer's output.

    Example k's gradient for layer l is ``delta_lk a_(l-1)k^T`` (and ``delta_lk`` for the bias).
    None of it depends on a query, so an evaluation pass over a fixed memory and a fixed theta
    computes it once for the whole memory (``keys`` (M, D), ``labels`` (M,)).
    """
    inputs, pre = [keys], []
    for i, (w, b) in enumerate(layers):
        pre.append(F.linear(inputs[-1], w, b))
        if i < len(layers) - 1:
            inputs.append(pre[-1].clamp_min(0.0))
    delta = _softmax_last(pre[-1])
    delta.scatter_add_(1, labels[:, None], torch.full_like(delta[:, :1], -1.0))
    deltas = [delta]
    for i in range(len(layers) - 1, 0, -1):
        delta = (delta @ layers[i][0]) * (pre[i - 1] > 0)   # ReLU' = 0 at 0, as autograd has it
        deltas.append(delta)
    return FirstStep(inputs, deltas[::-1], (keys * keys).sum(1))


def _first_step_sgd(layers: Layers, nb_x, nb_y, nb_w, queries, lr: float, nb_idx, nb_d2, terms) -> torch.Tensor:
    """One SGD step from theta, exactly, without a per-query copy of any weight.

    At theta every query shares the network, so a neighbour's backward pass is the same for
    every query that has it (:func:`first_step_terms`: once per distinct neighbour, or once per
    memory slot when ``terms`` are given). Layer l's gradient is ``sum_k w_k delta_lk a_(l-1)k^T``,
    so the adapted layer applied to the query's own input ``a`` is
    ``W a + b - lr sum_k w_k delta_lk (a_(l-1)k . a + 1)``: with the (B, M) matrix of the
    neighbours' ``w_k (a_(l-1)k . a + 1)`` in sparse storage (K entries a row), one sampled
    product for the dots and one sparse-dense product for the sum, B K d work a layer. For the
    first layer ``a`` is the query key and ``a_0k`` the neighbour key, so ``nb_d2`` (their squared
    distances, from the search) gives ``a_0k . a = (|q|^2 + |h_k|^2 - d2_k) / 2`` for free.
    """
    B, K = nb_y.shape
    if terms is None:
        if nb_x is None:
            raise ValueError("nb_x (the neighbours' keys) is needed unless terms are given")
        if nb_idx is None:
            nb_idx = torch.arange(B * K, device=nb_y.device).view(B, K)
            rows, labels = nb_x.reshape(B * K, -1), nb_y.reshape(B * K)
        else:
            used, nb_idx = torch.unique(nb_idx.reshape(-1), return_inverse=True)
            first = torch.empty(used.shape[0], dtype=torch.long, device=nb_y.device)
            first.scatter_(0, nb_idx, torch.arange(B * K, device=nb_y.device))   # any occurrence
            rows, labels = nb_x.reshape(B * K, -1)[first], nb_y.reshape(B * K)[first]
            nb_idx = nb_idx.view(B, K)
        terms = first_step_terms(layers, rows, labels)
    elif nb_idx is None:
        raise ValueError("terms index memory slots: pass nb_idx, the neighbours' slots")
    crow = torch.arange(0, B * K + 1, K, device=nb_y.device)
    col = nb_idx.reshape(-1)
    size = (B, terms.inputs[0].shape[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, col, torch.zeros(B * K, dtype=nb_w.dtype, device=nb_w.device), size,
                                          check_invariants=False)
        a = queries
        for i, (w, b) in enumerate(layers):
            if i == 0 and nb_d2 is not None:
                sq = terms.sqnorms.index_select(0, col).view(B, K)
                dots = 0.5 * ((queries * queries).sum(1, keepdim=True) + sq - nb_d2)
                dots = dots.masked_fill_(torch.isinf(nb_d2), 0.0)   # empty slots (d2 = inf) have w = 0
            else:
                dots = torch.sparse.sampled_addmm(pattern, a, terms.inputs[i].T, beta=0.0).values().view(B, K)
            coef = torch.sparse_csr_tensor(crow, col, (nb_w * (dots + 1.0)).reshape(-1), size, check_invariants=False)
            z = torch.addmm(b, a, w.T) - lr * (coef @ terms.deltas[i])
            a = z.clamp_min(0.0) if i < len(layers) - 1 else z
    return a


def _explicit(layers: Layers, nb_x, nb_y, nb_w, queries, steps: int, lr: float, beta: float,
              optimizer: str, decay: float, eps: float) -> torch.Tensor:
    """T steps on per-query copies (B, out, in), gradients in closed form by batched products.

    Activations are kept feature-major, (B, features, K): the products then have the K
    neighbours as their long axis, which runs several times faster than (B, K, features) when
    a layer has few outputs (10 classes). Biases ride in the products (``baddbmm``) and the
    element-wise work is done in place, fewer passes over (B, out, K) a step.
    """
    B = nb_x.shape[0]
    # broadcast views of theta until the first update makes each query's own copy
    params = [[w.expand(B, -1, -1), b.view(1, -1, 1).expand(B, -1, 1)] for w, b in layers]
    theta = [[w, b.view(-1, 1)] for w, b in layers]
    sq: list[list[torch.Tensor | None]] = [[None, None] for _ in layers]
    w_t = nb_w.unsqueeze(1)                              # (B, 1, K)
    target = torch.zeros(B, layers[-1][0].shape[0], nb_y.shape[1], dtype=nb_x.dtype,
                         device=nb_x.device).scatter_(1, nb_y.unsqueeze(1), w_t)    # w_k onehot(v_k)
    x_t = nb_x.transpose(1, 2)                           # (B, D, K), a view
    for step in range(steps):
        inputs, masks = [x_t], []
        for i, (w, b) in enumerate(params):
            z = torch.baddbmm(b, w, inputs[-1])          # (B, out, K)
            if i < len(params) - 1:
                masks.append(z > 0)                      # ReLU' = 0 at 0, as autograd has it
                inputs.append(z.clamp_min_(0.0))
        delta = torch.softmax(z, dim=1).mul_(w_t).sub_(target)
        for i in range(len(params) - 1, -1, -1):
            w = params[i][0]
            grads = (torch.bmm(delta, inputs[i].transpose(1, 2)), delta.sum(2, keepdim=True))
            if i > 0:   # back-propagate with this step's weights before they change
                delta = torch.bmm(w.transpose(1, 2), delta).mul_(masks[i - 1])
            for j, g in enumerate(grads):
                p = params[i][j]
                if beta:
                    g = g.add_(p - theta[i][j], alpha=beta)
                if optimizer == "rmsprop":   # torch.optim.RMSprop (centered=False, momentum=0)
                    sq[i][j] = g * g * (1.0 - decay) if sq[i][j] is None else \
                        sq[i][j].mul_(decay).addcmul_(g, g, value=1.0 - decay)
                    g = g.div_(sq[i][j].sqrt().add_(eps))
                params[i][j] = p - lr * g if step == 0 else p.sub_(g, alpha=lr)
    a = queries.unsqueeze(-1)                            # (B, D, 1)
    for i, (w, b) in enumerate(params):
        a = torch.baddbmm(b, w, a)
        if i < len(params) - 1:
            a = a.clamp_min_(0.0)
    return a.squeeze(-1)


def adapt_predict_mlp(layers: Layers, nb_x: torch.Tensor, nb_y: torch.Tensor, nb_w: torch.Tensor,
                      queries: torch.Tensor, *, steps: int, lr: float, beta: float = 0.0,
                      optimizer: str = "sgd", decay: float = 0.9, eps: float = 1e-6,
                      nb_idx: torch.Tensor | None = None, nb_d2: torch.Tensor | None = None,
                      terms: FirstStep | None = None,
                      chunk: int | None = None) -> torch.Tensor:
    """:func:`adapt_predict` for a ``Linear (ReLU Linear)*`` chain (see :func:`mlp_layers`),
    with the gradients in closed form instead of ``vmap(grad)``: the same result, faster.

    One SGD step (the paper's T = 1) makes no per-query copy at all (:func:`_first_step_sgd`):
    pass ``nb_idx`` (B, K), the neighbours' memory slots, so that a neighbour shared by several
    queries is back-propagated once, ``nb_d2`` (B, K), the distances the search returned, and,
    for a whole evaluation pass over a fixed memory, ``terms`` = :func:`first_step_terms` of the
    memory (then ``nb_idx`` indexes its rows). Otherwise every query's copy takes its T steps
    by batched matrix products, ``chunk`` queries at a time. ``nb_x`` may be None for one SGD
    step from ``terms``, which does not read it.
    """
    if optimizer not in ("sgd", "rmsprop"):
        raise ValueError(f"optimizer must be 'sgd' or 'rmsprop', got {optimizer!r}")
    layers = [(w.detach(), b.detach()) for w, b in layers]
    if steps == 0 or lr == 0.0:
        a = queries
        for i, (w, b) in enumerate(layers):
            a = F.linear(a, w, b)
            if i < len(layers) - 1:
                a = a.clamp_min(0.0)
        return a
    if steps == 1 and optimizer == "sgd":
        return _first_step_sgd(layers, nb_x, nb_y, nb_w, queries, lr, nb_idx, nb_d2, terms)
    if nb_x is None:
        raise ValueError("nb_x (the neighbours' keys) is needed unless the step is one SGD step from terms")
    chunk = chunk or queries.shape[0]
    return torch.cat([_explicit(layers, nb_x[i:i + chunk], nb_y[i:i + chunk], nb_w[i:i + chunk],
                                queries[i:i + chunk], steps, lr, beta, optimizer, decay, eps)
                      for i in range(0, queries.shape[0], chunk)])
