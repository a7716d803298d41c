"""MbPA on a language model's softmax layer, and the neural cache it is mixed with.

The adapted layer is the softmax (W: V x H, b: V), too big to copy per query. With plain SGD
it need not be copied: the gradient of sum_k w_k NLL(W h_k + b, v_k) is sum_k r_k h_k^T (and
sum_k r_k for b) with r_k = w_k (softmax(W h_k + b) - onehot(v_k)), a sum of K outer products,
and the beta term's gradient beta (W_t - W) stays in the same span. So after any number of
steps W_t = W - sum_k A_k h_k^T, b_t = b - sum_k A_k with coefficients A (K x V) updated by

    logits of neighbour j at step t = W h_j + b - sum_k A_k (h_k . h_j + 1)
    A <- (1 - alpha beta) A + alpha r

and the query's adapted logits are ``W q + b - sum_k A_k (h_k . q + 1)``: the base logits plus
a correction built from the K neighbours alone. For T = 1 (A starts at 0) the neighbours'
softmaxes do not depend on the query, so a batch shares them: one (B x U) @ (U x V) product
over the U distinct neighbours of the batch. RMSprop's update is not in that span; it takes
the explicit path (:func:`trainers.mbpa.adapt.adapt_predict` with a per-query copy).

The neural cache (Grave et al., 2017): p_cache(w | h_t) = sum_i softmax_i(theta h_t . h_i)
[x_{i+1} = w] over the stored (h_i, x_{i+1}).
"""

from __future__ import annotations

import warnings

import torch

from trainers.mbpa.adapt import adapt_predict, linear_fn

__all__ = ["softmax_sgd_correction", "softmax_explicit", "cache_probs", "mixture_log_probs"]


def softmax_sgd_correction(weight: torch.Tensor, bias: torch.Tensor, queries: torch.Tensor,
                           nb_h: torch.Tensor | None, nb_y: torch.Tensor, nb_w: torch.Tensor, *, steps: int,
                           lr: float, beta: float = 0.0, nb_idx: torch.Tensor | None = None,
                           cand_h: torch.Tensor | None = None, chunk: int = 16,
                           probs_table: tuple[torch.Tensor, torch.Tensor] | None = None,
                           nb_d2: torch.Tensor | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
    """Adapted logits (B, V) by the neighbour-only correction (plain SGD, exact).

    ``queries`` (B, H); ``nb_h`` (B, K, H), ``nb_y`` (B, K), ``nb_w`` (B, K). For ``steps == 1``
    pass ``nb_idx`` (B, K) indices into ``cand_h`` (U, H), the candidate keys the neighbours
    were drawn from, so that each distinct neighbour's softmax is computed once per batch, or
    ``probs_table = (table, rows)``: candidate c's unadapted softmax is ``table[rows[c]]`` (the
    LM evaluation keeps them, since a memory entry's softmax is the LSTM's own prediction at
    that position); the correction then reads just the K rows of each query, by one sparse
    (B x R, K entries a row) times dense product. With ``nb_d2`` (the search's squared
    distances) the dots ``h_k . q`` come from ``(|q|^2 + |h_k|^2 - d2) / 2`` and ``nb_h`` may be
    None. ``base``: the queries' unadapted logits, when the caller has them.
    """
    if base is None:
        base = queries @ weight.T + bias
    if steps == 0 or lr == 0.0:
        return base
    if nb_h is None:
        if nb_d2 is None or cand_h is None or nb_idx is None or steps != 1:
            raise ValueError("nb_h may be omitted only for steps=1 with nb_idx, cand_h and nb_d2")
        key_sq = (cand_h * cand_h).sum(1).index_select(0, nb_idx.reshape(-1)).view_as(nb_d2)
        dots = 0.5 * ((queries * queries).sum(1, keepdim=True) + key_sq - nb_d2)
        dots = dots.masked_fill_(torch.isinf(nb_d2), 0.0) + 1.0        # masked slots have w = 0
    else:
        dots = torch.einsum("bkh,bh->bk", nb_h, queries) + 1.0          # h_k . q + 1
    if steps == 1 and nb_idx is not None and probs_table is not None:
        table, rows = probs_table
        B, K = nb_idx.shape
        coef = nb_w * dots
        crow = torch.arange(0, B * K + 1, K, device=queries.device)
        col = rows.index_select(0, nb_idx.reshape(-1))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta")
            csr = torch.sparse_csr_tensor(crow, col, coef.reshape(-1), (B, table.shape[0]), check_invariants=False)
            correction = csr @ table
        correction.scatter_add_(1, nb_y, -coef)                         # minus the one-hot part
        return base - lr * correction
    if steps == 1 and nb_idx is not None and cand_h is not None:
        used, inverse = torch.unique(nb_idx, return_inverse=True)      # U distinct neighbours
        probs = torch.softmax(cand_h[used] @ weight.T + bias, dim=-1)  # (U, V)
        rows = torch.arange(queries.shape[0], device=queries.device)[:, None].expand_as(inverse)
        # sum_k w_k (h_k.q + 1) as a sparse (B, U) matrix: K non-zeros a row, so the product
        # costs B K V instead of B U V
        coef = torch.sparse_coo_tensor(torch.stack([rows.reshape(-1), inverse.reshape(-1)]),
                                       (nb_w * dots).reshape(-1), (queries.shape[0], used.shape[0]),
                                       check_invariants=False)
        correction = torch.sparse.mm(coef.coalesce(), probs)
        correction.scatter_add_(1, nb_y, -(nb_w * dots))                # minus the one-hot part
        return base - lr * correction
    outs = []
    for i in range(0, queries.shape[0], chunk):
        h, y, w = nb_h[i:i + chunk], nb_y[i:i + chunk], nb_w[i:i + chunk]
        nb_base = h @ weight.T + bias                                   # (b, K, V)
        gram = h @ h.transpose(1, 2) + 1.0                              # (b, K, K)
        onehot = torch.zeros_like(nb_base).scatter_(2, y[..., None], 1.0)
        coef = torch.zeros_like(nb_base)                                # A
        for _ in range(steps):
            probs = torch.softmax(nb_base - gram @ coef, dim=-1)
            coef = (1.0 - lr * beta) * coef + lr * w[..., None] * (probs - onehot)
        outs.append(base[i:i + chunk] - torch.einsum("bk,bkv->bv", dots[i:i + chunk], coef))
    return torch.cat(outs)


def softmax_explicit(weight: torch.Tensor, bias: torch.Tensor, queries: torch.Tensor, nb_h: torch.Tensor,
                     nb_y: torch.Tensor, nb_w: torch.Tensor, *, steps: int, lr: float, beta: float = 0.0,
                     optimizer: str = "sgd", decay: float = 0.9, eps: float = 1e-6,
                     chunk: int = 8) -> torch.Tensor:
    """Adapted logits (B, V) by explicit per-query copies of the softmax layer (any optimiser)."""
    return adapt_predict(linear_fn, {"weight": weight, "bias": bias}, nb_h, nb_y, nb_w, queries,
                         steps=steps, lr=lr, beta=beta, optimizer=optimizer, decay=decay, eps=eps,
                         chunk=chunk)


def cache_probs(queries: torch.Tensor, cand_h: torch.Tensor, cand_y: torch.Tensor, valid: torch.Tensor,
                theta: float, vocab: int) -> torch.Tensor:
    """Neural cache distribution (B, V) over the valid candidates; rows with none are all zero."""
    scores = (theta * (queries @ cand_h.T)).masked_fill(~valid, float("-inf"))
    attn = torch.softmax(scores, dim=1).nan_to_num_(0.0)                # all-masked row -> 0
    probs = torch.zeros(queries.shape[0], vocab, dtype=queries.dtype, device=queries.device)
    return probs.scatter_add_(1, cand_y[None, :].expand_as(attn), attn)


def mixture_log_probs(lstm_logits: torch.Tensor, cache: torch.Tensor | None, mbpa_logits: torch.Tensor | None,
                      lambda_cache: float, lambda_mbpa: float, has_memory: torch.Tensor) -> torch.Tensor:
    """log((1 - lc - lm) p_lstm + lc p_cache + lm p_mbpa), (B, V).

    Where a query has no memory yet (``has_memory`` False) both components fall back to p_lstm.
    With lc = lm = 0 this is exactly ``log_softmax(lstm_logits)``.
    """
    log_lstm = torch.log_softmax(lstm_logits, dim=-1)
    if lambda_cache == 0.0 and lambda_mbpa == 0.0:
        return log_lstm
    p_lstm = log_lstm.exp()
    mix = (1.0 - lambda_cache - lambda_mbpa) * p_lstm
    keep = has_memory[:, None]
    if lambda_cache > 0.0:
        mix = mix + lambda_cache * torch.where(keep, cache, p_lstm)
    if lambda_mbpa > 0.0:
        mix = mix + lambda_mbpa * torch.where(keep, torch.softmax(mbpa_logits, dim=-1), p_lstm)
    return mix.clamp_min(torch.finfo(mix.dtype).tiny).log()
