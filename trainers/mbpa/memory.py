"""The episodic memory: a circular buffer of (key, value) pairs and k-nearest neighbours.

Keys are embeddings h = f(x), values are labels (class or next word). Writes happen outside
the gradient (keys are detached copies). When full, the oldest entry is overwritten first.

Neighbours are exact by default: squared Euclidean distances by one matrix product
(``|q|^2 - 2 q.h + |h|^2``) and ``topk`` over the whole memory (bench/mbpa_adapt.py times it).
``index="ivf"`` answers the same ``search`` from an approximate inverted-file index (faiss
``IndexIVFFlat``, L2) over the stored keys; ``index="auto"`` uses it only above
``exact_up_to`` stored entries (10^5 by default, exact at or below). The tensors stay the source
of truth: the IVF is rebuilt lazily by the first search after any write, so it suits the MNIST
experiments (writes during training, searches only at evaluation) and would be a poor fit for
interleaved write/search. Only which neighbours are found is approximate: ``search`` returns
the stored keys and values of the found ids and recomputes their squared distances in torch.

Kernel weights ``w_k = 1 / (eps + ||q - h_k||^2)`` with eps = 1e-3 are **normalised** to sum
to one over the K neighbours. Why: the local loss is ``sum_k w_k NLL_k``; unnormalised, its
scale (and so the effective step alpha * w) would depend on the embedding's scale and on K, and
a query equal to a stored key would get weight 1/eps = 1000 and blow up a step with alpha = 1.
Normalised, alpha means the same thing for pixels, LSTM states and any K, which is what makes
the paper's alpha grid (0.01 to 1) meaningful across experiments. ``normalise=False`` gives
the raw kernel.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["EpisodicMemory", "knn", "kernel_weights", "default_nlist", "INDEX_KINDS", "DEFAULT_NPROBE",
           "EXACT_UP_TO"]

INDEX_KINDS = ("exact", "ivf", "auto")
# Inverted lists scanned per query. At 10^5 MNIST pixel keys (nlist 1,265), B = K = 256: nprobe
# 12 / 16 / 20 cost 52 / 65 / 76 ms of CPU on one thread (exact search: 589 ms) for recall@256
# 0.78 / 0.84 / 0.88 (@32: 0.93 / 0.96); on 2 shared threads 12 took 35-47 ms wall and 16
# 47-56 ms, so 12 is the largest that keeps the 50 ms target (bench/mbpa_adapt.py).
DEFAULT_NPROBE = 12
EXACT_UP_TO = 100_000       # index="auto": exact search up to this many stored entries
KMEANS_ITERATIONS = 10      # faiss's default for IVF training, set explicitly
KMEANS_POINTS_PER_LIST = 40 # k-means trains on at most this many sampled keys a list
# nlist = 4 sqrt(N) (the usual rule). At 10^5 pixel keys 2 sqrt(N) = 632 lists need more CPU for
# the same recall (nprobe 8: 68 ms for 0.78, against 52 ms with 1,265 lists) but build in a
# third of the time (4.6 s against 13.5 s of CPU on one thread).
NLIST_PER_SQRT_N = 4


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("the episodic memory's approximate index (memory_index=ivf or auto) needs faiss: "
                          "install faiss-cpu (pinned in requirements.lock: pip install faiss-cpu==1.15.1), "
                          "or use memory_index=exact") from exc
    return faiss


def default_nlist(size: int) -> int:
    """Inverted lists for ``size`` keys: 4 sqrt(N), at most N / 39 (faiss's minimum training
    points a centroid), at least 1."""
    return max(1, min(int(round(NLIST_PER_SQRT_N * math.sqrt(size))), size // 39))


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
                 dtype: torch.dtype = torch.float32, index: str = "exact", nprobe: int = DEFAULT_NPROBE,
                 nlist: int | None = None, exact_up_to: int = EXACT_UP_TO) -> None:
        if capacity < 1:
            raise ValueError(f"memory capacity must be >= 1, got {capacity}")
        if index not in INDEX_KINDS:
            raise ValueError(f"memory index must be one of {INDEX_KINDS}, got {index!r}")
        if nprobe < 1 or (nlist is not None and nlist < 1):
            raise ValueError(f"nprobe and nlist must be >= 1, got nprobe={nprobe} nlist={nlist}")
        if index == "ivf" or (index == "auto" and capacity > exact_up_to):
            _import_faiss()   # fail at construction, not at the first evaluation
        self.index, self.nprobe, self.nlist, self.exact_up_to = index, nprobe, nlist, exact_up_to
        self._version = 0     # bumped by every change; the IVF remembers the version it indexes
        self._ivf = None
        self._ivf_version = -1
        self.builds = 0       # IVF (re)builds so far
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
        self._version += 1

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) of the stored entries, oldest first."""
        size = len(self)
        if self.count <= self.capacity:
            order = torch.arange(size, device=self.keys.device)
        else:
            start = self.count % self.capacity
            order = (start + torch.arange(size, device=self.keys.device)) % self.capacity
        return self.keys[order], self.values[order], self.positions[order]

    def uses_ivf(self) -> bool:
        """Whether searches go through the approximate index at the current size."""
        return self.index == "ivf" or (self.index == "auto" and len(self) > self.exact_up_to)

    def nearest(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d2, slots)`` of the ``k' = min(k, len(self))`` nearest stored keys, nearest first.

        Through the IVF, ``d2`` are faiss's distances (exact float32 ones: IndexIVFFlat keeps the
        keys uncompressed) and a query whose probed lists hold fewer than k' keys gets slots 0
        with d2 = inf (weight 0), like the exact path's masked slots.
        """
        size = len(self)
        if size == 0:
            raise RuntimeError("the episodic memory is empty: write to it before searching")
        if not self.uses_ivf():
            return knn(queries.to(self.keys), self.keys[:size], k, key_sqnorms=self.sqnorms[:size])
        faiss = _import_faiss()
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = self._built_ivf(faiss)
        q = np.ascontiguousarray(queries.detach().reshape(queries.shape[0], -1).to("cpu", torch.float32).numpy())
        dist, ids = index.search(q, min(k, size))
        slots = torch.from_numpy(ids).to(self.keys.device)
        d2 = torch.from_numpy(dist).to(self.keys)
        missing = slots < 0
        return d2.masked_fill_(missing, float("inf")), slots.masked_fill_(missing, 0)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``k`` nearest stored keys of each query: ``(d2, keys, values)`` with shapes
        (B, k'), (B, k', D), (B, k') where k' = min(k, len(self)), nearest first."""
        d2, slots = self.nearest(queries, k)
        keys = self.keys[slots]
        if self.uses_ivf():   # the weights use torch's distances of the very keys returned
            q = queries.detach().reshape(queries.shape[0], -1).to(self.keys)
            exact = torch.baddbmm((self.sqnorms[slots] + (q * q).sum(1, keepdim=True)).unsqueeze(-1),
                                  keys, q.unsqueeze(-1), beta=1.0, alpha=-2.0).squeeze(-1).clamp_min_(0.0)
            d2 = exact.masked_fill_(torch.isinf(d2), float("inf"))
            if not bool((d2[:, 1:] >= d2[:, :-1]).all()):   # rounding may swap near-ties
                d2, order = torch.sort(d2, dim=1, stable=True)
                slots = slots.gather(1, order)
                keys = keys.gather(1, order.unsqueeze(-1).expand_as(keys))
        return d2, keys, self.values[slots]

    def _built_ivf(self, faiss):
        """The IVF over the stored keys, (re)built when the memory changed since the last build."""
        if self._ivf is not None and self._ivf_version == self._version:
            return self._ivf
        size = len(self)
        keys = np.ascontiguousarray(self.keys[:size].detach().to("cpu", torch.float32).numpy())
        nlist = min(self.nlist or default_nlist(size), size)
        quantizer = faiss.IndexFlatL2(keys.shape[1])
        index = faiss.IndexIVFFlat(quantizer, keys.shape[1], nlist, faiss.METRIC_L2)
        index.cp.niter = KMEANS_ITERATIONS
        index.cp.max_points_per_centroid = KMEANS_POINTS_PER_LIST
        index.cp.seed = 1234
        index.train(keys)
        index.add(keys)        # faiss ids 0..size-1 are the memory's slots
        index.nprobe = min(self.nprobe, nlist)
        self._ivf, self._ivf_version = index, self._version
        self.builds += 1
        return index

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
        self._version += 1
