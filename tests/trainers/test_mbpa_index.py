"""The episodic memory's approximate index (faiss IndexIVFFlat) behind ``EpisodicMemory.search``:
recall against float64 brute force on real MNIST pixels, exact distances of what it returns,
eviction, rebuild after writes, short results, checkpoints, and the trainer's wiring."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from hpsweep.trainer.run import LocalRun
from trainers.mbpa import Config, train
from trainers.mbpa.classify import _new_state
from trainers.mbpa.data import read_idx
from trainers.mbpa.memory import DEFAULT_NPROBE, EpisodicMemory, default_nlist, kernel_weights

DATA = Path(os.environ.get("HPSWEEP_SHARED_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
N_KEYS = 30000


def _images(name: str, n: int) -> torch.Tensor:
    images = read_idx(DATA / "mnist" / name)[:n]
    return torch.from_numpy(images.reshape(len(images), -1).astype("float32") / 255.0)


@pytest.fixture(scope="module")
def pixels():
    train_x = _images("train-images-idx3-ubyte.gz", N_KEYS)
    train_y = torch.from_numpy(read_idx(DATA / "mnist" / "train-labels-idx1-ubyte.gz")[:N_KEYS].astype("int64"))
    return train_x, train_y, _images("t10k-images-idx3-ubyte.gz", 256)


@pytest.fixture(scope="module")
def ivf_memory(pixels):
    keys, labels, _ = pixels
    memory = EpisodicMemory(N_KEYS, 784, index="ivf")
    memory.write(keys, torch.arange(N_KEYS))   # values name the image
    return memory


def _recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    k = found.shape[1]
    return sum(len(set(f) & set(t)) for f, t in zip(found.tolist(), truth[:, :k].tolist())) / found.numel()


def test_ivf_recall_against_float64_brute_force(pixels, ivf_memory):
    keys, _, queries = pixels
    d2_true = torch.cdist(queries.double(), keys.double()) ** 2
    truth = d2_true.topk(256, dim=1, largest=False).indices
    recall = {k: _recall(ivf_memory.nearest(queries, k)[1], truth) for k in (32, 256)}
    # Measured at the default nprobe=12, nlist=4 sqrt(30000)=693: 0.94 @32, 0.75 @256.
    assert ivf_memory._ivf.nlist == default_nlist(N_KEYS) == 693 and ivf_memory.nprobe == DEFAULT_NPROBE == 12
    assert recall[32] >= 0.90 and recall[256] >= 0.70, recall
    # No approximate neighbour can be nearer than the true j-th nearest.
    d2, _ = ivf_memory.nearest(queries, 256)
    sorted_true = d2_true.topk(256, dim=1, largest=False).values
    assert bool((d2.double() >= sorted_true - 1e-4).all())
    # Scanning every list is exhaustive: the exact neighbours.
    full = EpisodicMemory(N_KEYS, 784, index="ivf", nlist=64, nprobe=64)
    full.write(keys, torch.zeros(N_KEYS))
    assert _recall(full.nearest(queries, 32)[1], truth) == 1.0


def test_search_returns_stored_keys_with_exact_distances_nearest_first(pixels, ivf_memory):
    keys, _, queries = pixels
    d2, nb_keys, nb_values = ivf_memory.search(queries, 64)
    _, slots = ivf_memory.nearest(queries, 64)
    assert d2.shape == (256, 64) and nb_keys.shape == (256, 64, 784)
    assert torch.equal(nb_keys, keys[nb_values])   # each key with its own value
    # the neighbours `nearest` found (search may swap near-ties when it re-sorts by torch's d2)
    assert torch.equal(nb_values.sort(1).values, slots.sort(1).values)
    reference = ((nb_keys.double() - queries.double()[:, None]) ** 2).sum(-1)
    assert torch.allclose(d2.double(), reference, rtol=1e-5, atol=1e-3)
    assert bool((d2[:, 1:] >= d2[:, :-1]).all())
    w = kernel_weights(d2)
    assert torch.allclose(w.sum(1), torch.ones(256))


def test_evicted_keys_are_never_returned(pixels):
    keys, _, _ = pixels
    memory = EpisodicMemory(2000, 784, index="ivf", nlist=8, nprobe=8)   # nprobe = nlist: exhaustive
    memory.write(keys[:2000], torch.arange(2000))
    assert set(memory.search(keys[:100], 16)[2].flatten().tolist()) & set(range(100))   # found while stored
    memory.write(keys[2000:3500], torch.arange(2000, 3500))   # evicts writes 0..1499
    d2, nb_keys, values = memory.search(keys[:100], 16)
    assert values.min() >= 1500 and memory.builds == 2
    exact = EpisodicMemory(2000, 784)
    exact.write(keys[:3500], torch.arange(3500))
    d2_exact, _, values_exact = exact.search(keys[:100], 16)
    assert torch.allclose(d2, d2_exact, rtol=1e-5, atol=1e-3)
    assert (values == values_exact).float().mean() > 0.99    # only near-ties may swap


def test_rebuilt_after_writes_and_only_then(pixels):
    keys, labels, queries = pixels
    memory = EpisodicMemory(5000, 784, index="ivf")
    memory.write(keys[:3000], labels[:3000])
    memory.search(queries[:8], 4)
    memory.search(queries[:8], 4)
    assert memory.builds == 1
    memory.write(queries[:1], torch.tensor([77]))              # written after a search
    d2, nb, values = memory.search(queries[:1], 1)
    assert memory.builds == 2 and values.item() == 77 and torch.equal(nb[0, 0], queries[0])
    assert d2.item() < 1e-4    # |q|^2 - 2 q.h + |h|^2 in float32, as on the exact path


def test_fewer_entries_than_k_and_short_lists(pixels):
    keys, labels, queries = pixels
    small = EpisodicMemory(100, 784, index="ivf")
    small.write(keys[:50], labels[:50])
    d2, nb, values = small.search(queries[:4], 256)
    assert d2.shape == (4, 50) and torch.isfinite(d2).all()    # one list (50 < 39 * 2): all found
    assert sorted(small.nearest(queries[:4], 256)[1][0].tolist()) == list(range(50))
    # One probed list out of 10 holds fewer than k keys: the rest are weight-0 slots.
    sparse = EpisodicMemory(1000, 784, index="ivf", nlist=10, nprobe=1)
    sparse.write(keys[:1000], labels[:1000])
    d2, nb, values = sparse.search(queries[:16], 400)
    finite = torch.isfinite(d2)
    assert d2.shape == (16, 400) and bool((~finite).any()) and bool(finite[:, 0].all())
    assert bool((finite[:, 1:] <= finite[:, :-1]).all())       # the missing slots come last
    w = kernel_weights(d2)
    assert bool((w[~finite] == 0).all()) and torch.allclose(w.sum(1), torch.ones(16))
    for row in range(16):   # the found ones are distinct stored keys
        n = int(finite[row].sum())
        assert len(set(sparse.nearest(queries[row:row + 1], 400)[1][0, :n].tolist())) == n


def test_state_dict_round_trip_and_format(pixels):
    keys, labels, queries = pixels
    ivf = EpisodicMemory(3000, 784, index="ivf")
    exact = EpisodicMemory(3000, 784)
    for memory in (ivf, exact):
        memory.write(keys[:4000], labels[:4000])
    ivf.search(queries[:8], 8)
    state = ivf.state_dict()
    assert state.keys() == exact.state_dict().keys()
    assert all(torch.equal(state[k], exact.state_dict()[k]) for k in ("keys", "values", "positions"))
    copy = EpisodicMemory(3000, 784, index="ivf")
    copy.load_state_dict(state)
    for a, b in zip(copy.search(queries[:8], 8), ivf.search(queries[:8], 8)):
        assert torch.equal(a, b)
    ivf.load_state_dict(EpisodicMemory(3000, 784).state_dict() | {"keys": keys[:10], "values": labels[:10],
                                                                     "positions": torch.arange(10), "count": 10})
    assert len(ivf) == 10 and ivf.search(keys[3:4], 1)[2].item() == labels[3].item()   # rebuilt


def test_auto_is_exact_up_to_the_threshold(pixels):
    keys, labels, queries = pixels
    memory = EpisodicMemory(2000, 784, index="auto", exact_up_to=1000)
    memory.write(keys[:1000], labels[:1000])
    assert not memory.uses_ivf()
    memory.search(queries[:4], 4)
    assert memory.builds == 0
    memory.write(keys[1000:1001], labels[1000:1001])
    assert memory.uses_ivf()
    memory.search(queries[:4], 4)
    assert memory.builds == 1


def test_missing_faiss_is_an_informative_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="faiss-cpu"):
        EpisodicMemory(10, 2, index="ivf")
    EpisodicMemory(10, 2, index="auto")   # small enough to stay exact: no faiss needed
    with pytest.raises(ValueError, match="memory index"):
        EpisodicMemory(10, 2, index="hnsw")


def test_config_validates_and_the_trainer_passes_the_index():
    with pytest.raises(ValueError, match="index_nprobe"):
        Config(index_nprobe=0)
    with pytest.raises(ValueError, match="memory_index"):
        Config(memory_index="lsh")
    _, _, memory = _new_state(Config(memory_index="ivf", index_nprobe=3, index_nlist=7), torch.device("cpu"))
    assert (memory.index, memory.nprobe, memory.nlist) == ("ivf", 3, 7)


def test_incremental_run_with_an_exhaustive_ivf_matches_exact(tmp_path):
    torch.set_num_threads(1)
    base = dict(experiment="incremental", method="mbpa", data_dir=str(DATA / "mnist"), train_per_task=300,
                test_per_task=200, pretrain_epochs=1, incremental_updates=4, eval_every=2, memory_size=800,
                neighbours=8, steps=1, alpha=0.1, hidden=32)
    history = {}
    for name, extra in (("exact", {}), ("ivf", dict(memory_index="ivf", index_nlist=4, index_nprobe=4))):
        run = LocalRun(tmp_path / name, device=torch.device("cpu"))
        train(Config(**base, **extra), run)
        history[name] = [{k: v for k, v in row.items() if k != "time"} for row in run.history]
    assert len(history["ivf"]) == 3 and history["ivf"] == history["exact"]
