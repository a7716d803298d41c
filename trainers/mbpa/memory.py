"""The episodic memory: a circular buffer of (key, value) pairs and exact k-nearest neighbours.

Keys are embeddings h = f(x), values are labels (class or next word). Writes happen outside
the gradient (keys are detached copies). When full, the oldest entry is overwritten first.

Neighbours are exact: squared Euclidean distances by one matrix product
(``|q|^2 - 2 q.h + |h|^2``) and ``topk`` over the whole memory, which on CPU handles 10^5
keys for a batch of 256 queries in tens of milliseconds (bench/mbpa_adapt.py).

Kernel weights ``w_k = 1 / (eps + ||q - h_k||^2)`` with eps = 1e-3 are **normalised** to sum
to one over the K neighbours. Why: the local loss is ``sum_k w_k NLL_k``; unnormalised, its
scale (and so the effective step alpha * w) would depend on the embedding's scale and on K, and
a query equal to a stored key would get weight 1/eps = 1000 and blow up a step with alpha = 1.
Normalised, alpha means the same thing for pixels, LSTM states and any K, which is what makes
the paper's alpha grid (0.01 to 1) meaningful across experiments. ``normalise=False`` gives
the raw kernel.
"""

from __future__ import annotations

import torch

__all__ = ["EpisodicMemory", "knn", "kernel_weights"]


def knn(queries: torch.Tensor, keys: torch.Tensor, k: int, valid: torch.Tensor | None = None,
        key_sqnorms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest ``keys`` of every query (squared Euclidean distance).

    ``queries`` (B, D), ``keys`` (M, D); ``valid`` (B, M) bool masks out candidates (their
    distance becomes +inf, so when fewer than ``k`` are valid the extra slots carry weight 0).
    Returns ``(d2, idx)``, both (B, min(k, M)), nearest first.
    """
    k = min(k, keys.shape[0])
    if key_sqnorms is None:
        key_sqnorms = (keys * keys).sum(1)
    # Rank by 2 q.h - |h|^2 (= |q|^2 - d2, |q|^2 being constant along a row): one fused
    # matrix product and one top-k pass over the (B, M) scores, nothing else at that size.
    score = torch.addmm(key_sqnorms[None, :], queries, keys.T, beta=-1.0, alpha=2.0)
    if valid is not None:
        score = score.masked_fill_(~valid, float("-inf"))
    top, idx = torch.topk(score, k, dim=1, largest=True, sorted=True)
    d2 = ((queries * queries).sum(1, keepdim=True) - top).clamp_min_(0.0)  # rounding can dip below 0
    return d2, idx


def kernel_weights(d2: torch.Tensor, eps: float = 1e-3, normalise: bool = True) -> torch.Tensor:
    """``w_k = 1 / (eps + d2_k)``, optionally normalised over the last axis (see module doc)."""
    w = 1.0 / (eps + d2)  # d2 = inf (masked slot) gives exactly 0
    if normalise:
        w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return w


class EpisodicMemory:
    """A fixed-capacity circular memory of (key, value) pairs.

    ``positions`` holds each entry's write index (0, 1, 2, ...), so the language model can mask
    entries by age; ``count`` is the total number of writes ever made.
    """

    def __init__(self, capacity: int, key_dim: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if capacity < 1:
            raise ValueError(f"memory capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.keys = torch.zeros(capacity, key_dim, device=device, dtype=dtype)
        self.values = torch.zeros(capacity, dtype=torch.long, device=device)
        self.positions = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.sqnorms = torch.zeros(capacity, device=device, dtype=dtype)
        self.count = 0

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    @torch.no_grad()
    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append a batch; once full, the oldest entries are overwritten first."""
        keys = keys.detach().reshape(keys.shape[0], -1).to(self.keys)
        values = values.detach().reshape(-1).to(self.values.device, torch.long)
        n = keys.shape[0]
        if n > self.capacity:  # only the newest `capacity` would survive anyway
            keys, values = keys[-self.capacity:], values[-self.capacity:]
            self.count += n - self.capacity
            n = self.capacity
        pos = self.count + torch.arange(n, device=self.keys.device)
        slot = pos % self.capacity
        self.keys[slot] = keys
        self.values[slot] = values
        self.positions[slot] = pos
        self.sqnorms[slot] = (keys * keys).sum(1)
        self.count += n

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) of the stored entries, oldest first."""
        size = len(self)
        if self.count <= self.capacity:
            order = torch.arange(size, device=self.keys.device)
        else:
            start = self.count % self.capacity
            order = (start + torch.arange(size, device=self.keys.device)) % self.capacity
        return self.keys[order], self.values[order], self.positions[order]

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``k`` nearest stored keys of each query: ``(d2, keys, values)`` with shapes
        (B, k'), (B, k', D), (B, k') where k' = min(k, len(self))."""
        size = len(self)
        if size == 0:
            raise RuntimeError("the episodic memory is empty: write to it before searching")
        d2, idx = knn(queries.to(self.keys), self.keys[:size], k, key_sqnorms=self.sqnorms[:size])
        return d2, self.keys[idx], self.values[idx]

    def state_dict(self) -> dict:
        size = len(self)
        return {"capacity": self.capacity, "count": self.count, "keys": self.keys[:size].clone(),
                "values": self.values[:size].clone(), "positions": self.positions[:size].clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"checkpoint memory capacity {state['capacity']} != {self.capacity}")
        size = state["keys"].shape[0]
        self.keys[:size] = state["keys"].to(self.keys)
        self.values[:size] = state["values"].to(self.values.device)
        self.positions[:size] = state["positions"].to(self.positions.device)
        self.sqnorms[:size] = (self.keys[:size] ** 2).sum(1)
        self.count = int(state["count"])
