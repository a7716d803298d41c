"""The closed-form batched adaptation of a Linear/ReLU chain (``adapt_predict_mlp``).

The reference is independent: ``adapt_predict_loop``, autograd and ``torch.optim`` on a copy
per query, in float64, on neighbours drawn from real MNIST images.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainers.mbpa.adapt import (
    adapt_predict,
    adapt_predict_loop,
    adapt_predict_mlp,
    first_step_terms,
    linear_fn,
    mlp_layers,
)
from trainers.mbpa.data import read_idx
from trainers.mbpa.memory import kernel_weights, knn
from trainers.mbpa.models import MLP

DATA = Path(os.environ.get("HPSWEEP_SHARED_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))


@pytest.fixture(scope="module")
def digits():
    images = read_idx(DATA / "mnist" / "t10k-images-idx3-ubyte.gz")[:4000]
    labels = read_idx(DATA / "mnist" / "t10k-labels-idx1-ubyte.gz")[:4000]
    return torch.from_numpy(images.reshape(len(images), -1).copy()).double() / 255.0, torch.from_numpy(labels.copy()).long()


def _setup(digits, keys: str, B=12, K=24, hidden=16, seed=0):
    """A trained-looking MLP (random init), a memory of 1,500 digits, B queries and their K neighbours.

    ``keys="pixels"``: g is the whole MLP; ``"hidden"``: g is the output layer, keys are features.
    """
    x, y = digits
    torch.manual_seed(seed)
    model = MLP(hidden).double()
    mem_x, mem_y, q = x[:1500], y[:1500], x[3000:3000 + B]
    if keys == "hidden":
        with torch.no_grad():
            mem_x, q = model.features(mem_x), model.features(q)
        module = model.out
    else:
        module = model
    d2, idx = knn(q, mem_x, K)
    return module, mem_x[idx], mem_y[idx], kernel_weights(d2), q, idx, (mem_x, mem_y, d2)


@pytest.mark.parametrize("keys", ["pixels", "hidden"])
@pytest.mark.parametrize("optimizer,steps,beta", [("sgd", 1, 0.0), ("sgd", 1, 3.0), ("sgd", 4, 0.5),
                                                  ("rmsprop", 1, 0.0), ("rmsprop", 3, 0.5)])
def test_closed_form_adaptation_equals_autograd_per_query_loop(digits, keys, optimizer, steps, beta):
    module, nb_x, nb_y, w, q, idx, (mem_x, mem_y, d2) = _setup(digits, keys)
    before = {n: p.clone() for n, p in module.state_dict().items()}
    ref = adapt_predict_loop(module, nb_x, nb_y, w, q, steps=steps, lr=0.4, beta=beta, optimizer=optimizer)
    with torch.no_grad():
        assert (ref - module(q)).abs().max() > 1e-2          # the problem does adapt
    layers = mlp_layers(module)
    whole_memory = first_step_terms(layers, mem_x, mem_y)     # 1,500 slots: the (B, K, d) gather path
    for extra in ({}, {"nb_idx": idx}, {"nb_idx": idx, "nb_d2": d2}, {"nb_idx": idx, "terms": whole_memory},
                  {"nb_idx": idx, "terms": whole_memory, "nb_d2": d2}):
        got = adapt_predict_mlp(layers, nb_x, nb_y, w, q, steps=steps, lr=0.4, beta=beta, optimizer=optimizer,
                                chunk=5, **extra)
        assert torch.allclose(got, ref, atol=1e-10, rtol=0), (sorted(extra), (got - ref).abs().max())
    assert all(torch.equal(before[n], p) for n, p in module.state_dict().items())   # theta untouched


def test_shared_neighbours_are_deduplicated_not_mixed_up(digits):
    """Many queries share neighbours (nearby digits): the one-step path back-propagates each
    distinct slot once; its result must still be each query's own."""
    module, nb_x, nb_y, w, q, idx, _ = _setup(digits, "pixels", B=40, K=64)
    assert torch.unique(idx).numel() < idx.numel() // 2      # heavy sharing in this problem
    got = adapt_predict_mlp(mlp_layers(module), nb_x, nb_y, w, q, steps=1, lr=0.7, nb_idx=idx)
    ref = adapt_predict_loop(module, nb_x, nb_y, w, q, steps=1, lr=0.7)
    assert torch.allclose(got, ref, atol=1e-10, rtol=0), (got - ref).abs().max()
    flipped = adapt_predict_mlp(mlp_layers(module), nb_x.flip(0), nb_y.flip(0), w.flip(0), q, steps=1,
                                lr=0.7, nb_idx=idx.flip(0))
    assert (flipped - ref).abs().max() > 1e-3                # other queries' neighbours give other answers


def test_closed_form_agrees_with_the_generic_vmap_path_in_float32(digits):
    module, nb_x, nb_y, w, q, _, _ = _setup(digits, "hidden")
    module, nb_x, w, q = module.float(), nb_x.float(), w.float(), q.float()
    theta = {n: p.detach() for n, p in module.named_parameters()}
    for steps, opt in ((1, "sgd"), (5, "sgd"), (2, "rmsprop")):
        got = adapt_predict_mlp(mlp_layers(module), nb_x, nb_y, w, q, steps=steps, lr=0.3, beta=0.1, optimizer=opt)
        ref = adapt_predict(linear_fn, theta, nb_x, nb_y, w, q, steps=steps, lr=0.3, beta=0.1, optimizer=opt)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()


def test_no_steps_or_zero_rate_is_the_model_bit_for_bit(digits):
    module, nb_x, nb_y, w, q, idx, _ = _setup(digits, "pixels")
    module, nb_x, w, q = module.float(), nb_x.float(), w.float(), q.float()
    with torch.no_grad():
        base = module(q)
    for steps, lr, opt in ((0, 0.5, "sgd"), (3, 0.0, "rmsprop"), (1, 0.0, "sgd")):
        out = adapt_predict_mlp(mlp_layers(module), nb_x, nb_y, w, q, steps=steps, lr=lr, optimizer=opt, nb_idx=idx)
        assert torch.equal(out, base)


def test_empty_slots_with_infinite_distance_carry_no_weight(digits):
    """An approximate search may return fewer than K neighbours: slot 0 with d2 = inf (w = 0)."""
    module, nb_x, nb_y, w, q, idx, (mem_x, mem_y, d2) = _setup(digits, "pixels")
    d2, idx = d2.clone(), idx.clone()
    d2[:, -5:], idx[:, -5:] = float("inf"), 0
    w = kernel_weights(d2)
    nb_x, nb_y = mem_x[idx], mem_y[idx]
    layers = mlp_layers(module)
    ref = adapt_predict_loop(module, nb_x, nb_y, w, q, steps=1, lr=0.4)
    got = adapt_predict_mlp(layers, None, nb_y, w, q, steps=1, lr=0.4, nb_idx=idx, nb_d2=d2,
                            terms=first_step_terms(layers, mem_x, mem_y))
    assert torch.isfinite(got).all() and torch.allclose(got, ref, atol=1e-10, rtol=0), (got - ref).abs().max()
    with pytest.raises(ValueError, match="nb_x"):
        adapt_predict_mlp(layers, None, nb_y, w, q, steps=2, lr=0.4, nb_idx=idx)


def test_terms_without_slots_is_refused(digits):
    module, nb_x, nb_y, w, q, _, (mem_x, mem_y, _) = _setup(digits, "hidden")
    layers = mlp_layers(module)
    with pytest.raises(ValueError, match="nb_idx"):
        adapt_predict_mlp(layers, nb_x, nb_y, w, q, steps=1, lr=0.1, terms=first_step_terms(layers, mem_x, mem_y))


def test_mlp_layers_accepts_only_linear_relu_chains():
    assert [tuple(w.shape) for w, _ in mlp_layers(MLP(7))] == [(7, 784), (7, 7), (10, 7)]
    assert len(mlp_layers(torch.nn.Linear(3, 2))) == 1
    for bad in (torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)),
                torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()),
                torch.nn.Linear(3, 2, bias=False)):
        with pytest.raises(ValueError, match="Linear/ReLU chain"):
            mlp_layers(bad)


@pytest.mark.parametrize("keys", ["pixels", "hidden"])
def test_trainer_predictions_match_the_generic_path_on_a_wrapped_memory(digits, keys):
    """classify.mbpa_logits (memory slots, one-step terms of the whole memory) against
    adapt_predict (vmap(grad) over the K nearest keys, found independently by brute force)."""
    from trainers.mbpa.classify import mbpa_logits, memory_key, memory_terms
    from trainers.mbpa.config import Config
    from trainers.mbpa.memory import EpisodicMemory

    x, y = digits
    x32 = x.float()
    torch.manual_seed(1)
    model = MLP(16)
    cfg = Config(keys=keys, neighbours=20, steps=1, alpha=0.3, hidden=16)
    memory = EpisodicMemory(700, 784 if keys == "pixels" else 16)
    for i in range(0, 1000, 100):                       # 1,000 writes into 700 slots: wrapped
        memory.write(memory_key(model, x32[i:i + 100], keys), y[i:i + 100])
    q = x32[3000:3012]
    terms = memory_terms(model, memory, cfg)
    got = mbpa_logits(model, memory, q, cfg, terms)
    assert torch.allclose(got, mbpa_logits(model, memory, q, cfg), atol=1e-5)   # with and without terms
    stored_x, stored_y, _ = memory.contents()
    assert torch.equal(stored_y, y[300:1000])              # the oldest 300 were evicted
    qk = memory_key(model, q, keys)
    d2 = torch.cdist(qk.double(), stored_x.double()) ** 2
    d2, idx = d2.topk(20, largest=False)
    g = model if keys == "pixels" else model.out
    theta = {n: p.detach() for n, p in g.named_parameters()}
    ref = adapt_predict(lambda p, i: torch.func.functional_call(g, p, (i,)), theta, stored_x[idx], stored_y[idx],
                        kernel_weights(d2.float()), qk, steps=1, lr=0.3)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    with torch.no_grad():
        assert (got - model(q)).abs().max() > 1e-2
