"""MbPA numerics: memory, kNN, kernel weights, batched local adaptation, the LM softmax correction.

References are independent: float64 brute force for kNN, ``torch.optim`` + autograd on a
per-query copy for local adaptation, explicit per-query softmax copies for the correction.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainers.mbpa.adapt import adapt_predict, adapt_predict_loop, linear_fn
from trainers.mbpa.data import read_idx
from trainers.mbpa.lm_adapt import cache_probs, mixture_log_probs, softmax_explicit, softmax_sgd_correction
from trainers.mbpa.memory import EpisodicMemory, kernel_weights, knn
from trainers.mbpa.models import MLP

DATA = Path(os.environ.get("HPSWEEP_SHARED_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))


@pytest.fixture(scope="module")
def mnist():
    images = read_idx(DATA / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(DATA / "mnist" / "t10k-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.reshape(len(images), -1).copy()).double() / 255.0
    return x, torch.from_numpy(labels.copy()).long()


# --- memory ----------------------------------------------------------------------------------

def test_memory_evicts_oldest_first_and_wraps():
    mem = EpisodicMemory(5, 2)
    mem.write(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 2]))
    assert len(mem) == 3
    mem.write(torch.arange(6.0, 14.0).view(4, 2), torch.tensor([3, 4, 5, 6]))
    keys, values, positions = mem.contents()
    assert values.tolist() == [2, 3, 4, 5, 6]          # entries 0 and 1 (the oldest) are gone
    assert positions.tolist() == [2, 3, 4, 5, 6]
    assert torch.equal(keys[:, 0], torch.tensor([4.0, 6.0, 8.0, 10.0, 12.0]))
    mem.write(torch.full((7, 2), -1.0), torch.arange(100, 107))  # more than capacity at once
    assert mem.contents()[1].tolist() == [102, 103, 104, 105, 106] and mem.count == 14
    copy = EpisodicMemory(5, 2)
    copy.load_state_dict(mem.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(copy.contents(), mem.contents())) and copy.count == 14


def test_knn_returns_true_neighbours_against_float64_brute_force(mnist):
    x, _ = mnist
    keys, queries = x[:5000], x[5000:5064]
    d2, idx = knn(queries.float(), keys.float(), 32)
    brute = torch.cdist(queries, keys) ** 2                     # float64
    true_d2, true_idx = torch.topk(brute, 32, largest=False)
    got_true_d2 = brute.gather(1, idx)                           # float64 distance of what we returned
    assert torch.allclose(got_true_d2, true_d2, rtol=1e-5, atol=1e-4), (got_true_d2 - true_d2).abs().max()
    assert torch.allclose(d2.double(), true_d2, rtol=1e-4, atol=1e-2)
    unique = (true_d2[:, 1:] - true_d2[:, :-1]).abs().min(1).values > 1e-3   # rows without near-ties
    assert unique.sum() > 30
    assert torch.equal(idx[unique].sort(1).values, true_idx[unique].sort(1).values)
    valid = torch.rand(64, 5000, generator=torch.Generator().manual_seed(0)) < 0.5
    d2m, idxm = knn(queries.float(), keys.float(), 8, valid)
    assert bool(valid.gather(1, idxm).all())
    ref = brute.masked_fill(~valid, float("inf")).topk(8, largest=False).values
    assert torch.allclose(brute.gather(1, idxm), ref, rtol=1e-5, atol=1e-4)


def test_kernel_weights():
    d2 = torch.tensor([[0.0, 1.0, float("inf")]], dtype=torch.float64)
    raw = kernel_weights(d2, 1e-3, normalise=False)
    assert torch.allclose(raw, torch.tensor([[1000.0, 1 / 1.001, 0.0]], dtype=torch.float64))
    w = kernel_weights(d2, 1e-3)
    assert torch.allclose(w, raw / raw.sum()) and w[0, 2] == 0
    assert torch.equal(kernel_weights(torch.full((1, 3), float("inf"))), torch.zeros(1, 3))


# --- local adaptation ------------------------------------------------------------------------

def _problem(mnist, dtype=torch.float64, B=6, K=10, hidden=16, seed=0):
    x, y = mnist
    torch.manual_seed(seed)
    model = MLP(hidden).to(dtype)
    mem_x, mem_y = x[:2000].to(dtype), y[:2000]
    queries = x[3000:3000 + B].to(dtype)
    d2, idx = knn(queries, mem_x, K)
    return model, mem_x[idx], mem_y[idx], kernel_weights(d2), queries


def _theta(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def _fn(model):
    return lambda p, inp: torch.func.functional_call(model, p, (inp,))


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"])
@pytest.mark.parametrize("steps", [1, 3])
def test_batched_adaptation_equals_per_query_loop(mnist, optimizer, steps):
    model, nb_x, nb_y, w, q = _problem(mnist)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    got = adapt_predict(_fn(model), _theta(model), nb_x, nb_y, w, q, steps=steps, lr=0.3, beta=0.5,
                        optimizer=optimizer, chunk=4)
    ref = adapt_predict_loop(model, nb_x, nb_y, w, q, steps=steps, lr=0.3, beta=0.5, optimizer=optimizer)
    assert torch.allclose(got, ref, atol=1e-6, rtol=0), (got - ref).abs().max()
    with torch.no_grad():
        assert (got - model(q)).abs().max() > 1e-3         # it did adapt
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())   # theta untouched


def test_alpha_zero_or_no_steps_gives_the_unadapted_prediction_exactly(mnist):
    model, nb_x, nb_y, w, q = _problem(mnist, torch.float32)
    with torch.no_grad():
        base = model(q)
    for steps, lr in ((0, 0.5), (5, 0.0)):
        for opt in ("sgd", "rmsprop"):
            out = adapt_predict(_fn(model), _theta(model), nb_x, nb_y, w, q, steps=steps, lr=lr, optimizer=opt)
            assert torch.equal(out, base)


def test_one_step_does_not_depend_on_beta(mnist):
    model, nb_x, nb_y, w, q = _problem(mnist)
    outs = [adapt_predict(_fn(model), _theta(model), nb_x, nb_y, w, q, steps=1, lr=0.5, beta=beta)
            for beta in (0.0, 1.0, 100.0)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    two = [adapt_predict(_fn(model), _theta(model), nb_x, nb_y, w, q, steps=2, lr=0.5, beta=beta)
           for beta in (0.0, 1.0)]
    assert (two[0] - two[1]).abs().max() > 1e-8            # ... but later steps do


# --- LM softmax ------------------------------------------------------------------------------

def _softmax_problem(B=5, K=12, H=8, V=50, U=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    cand_h = torch.randn(U, H, generator=g, dtype=torch.float64)
    cand_y = torch.randint(V, (U,), generator=g)
    q = torch.randn(B, H, generator=g, dtype=torch.float64)
    d2, idx = knn(q, cand_h, K)
    return W, b, q, cand_h, cand_y, idx, kernel_weights(d2)


@pytest.mark.parametrize("steps,beta", [(1, 0.0), (1, 2.0), (3, 0.0), (4, 0.7)])
def test_softmax_neighbour_correction_equals_explicit_adaptation(steps, beta):
    W, b, q, cand_h, cand_y, idx, w = _softmax_problem()
    nb_h, nb_y = cand_h[idx], cand_y[idx]
    got = softmax_sgd_correction(W, b, q, nb_h, nb_y, w, steps=steps, lr=0.8, beta=beta, nb_idx=idx,
                                 cand_h=cand_h, chunk=2)
    ref = softmax_explicit(W, b, q, nb_h, nb_y, w, steps=steps, lr=0.8, beta=beta)
    assert torch.allclose(got, ref, atol=1e-10), (got - ref).abs().max()
    layer = torch.nn.Linear(8, 50).double()
    with torch.no_grad():
        layer.weight.copy_(W)
        layer.bias.copy_(b)
    loop = adapt_predict_loop(layer, nb_h, nb_y, w, q, steps=steps, lr=0.8, beta=beta)
    assert torch.allclose(got, loop, atol=1e-10)
    assert (got - (q @ W.T + b)).abs().max() > 1e-3
    if steps == 1:   # the chunked general path agrees with the shared-softmax fast path
        slow = softmax_sgd_correction(W, b, q, nb_h, nb_y, w, steps=1, lr=0.8, beta=beta)
        assert torch.allclose(got, slow, atol=1e-12)
        # ... and so do kept softmaxes in a shuffled table, with the dots from the distances
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:30]    # candidate -> row
        table = torch.zeros(40, 50, dtype=torch.float64)
        table[perm] = torch.softmax(cand_h @ W.T + b, dim=-1)
        d2 = ((q[:, None, :] - nb_h) ** 2).sum(-1)
        kept = softmax_sgd_correction(W, b, q, None, nb_y, w, steps=1, lr=0.8, beta=beta, nb_idx=idx,
                                      cand_h=cand_h, probs_table=(table, perm), nb_d2=d2)
        assert torch.allclose(kept, ref, atol=1e-10), (kept - ref).abs().max()
        with pytest.raises(ValueError, match="nb_h may be omitted"):
            softmax_sgd_correction(W, b, q, None, nb_y, w, steps=2, lr=0.8, nb_idx=idx, cand_h=cand_h, nb_d2=d2)


def test_softmax_correction_masked_neighbours_and_zero_alpha():
    W, b, q, cand_h, cand_y, idx, _ = _softmax_problem()
    valid = torch.zeros(5, 30, dtype=torch.bool)
    valid[:, :4] = True
    valid[4] = False                         # a query with no memory at all
    d2, idx = knn(q, cand_h, 12, valid)
    w = kernel_weights(d2)
    nb_h, nb_y = cand_h[idx], cand_y[idx]
    got = softmax_sgd_correction(W, b, q, nb_h, nb_y, w, steps=1, lr=0.5, nb_idx=idx, cand_h=cand_h)
    ref = softmax_explicit(W, b, q[:4], cand_h[:4].expand(4, 4, 8), cand_y[:4].expand(4, 4),
                           kernel_weights(torch.cdist(q[:4], cand_h[:4]) ** 2), steps=1, lr=0.5)
    assert torch.allclose(got[:4], ref, atol=1e-10)
    # a query with no memory keeps its unadapted logits exactly; computed over the batch as the
    # function does (a matrix-vector product of q[4] alone rounds differently, ~1e-15)
    assert torch.equal(got[4], (q @ W.T + b)[4])
    assert torch.equal(softmax_sgd_correction(W, b, q, nb_h, nb_y, w, steps=3, lr=0.0), q @ W.T + b)


def test_cache_probs_against_a_loop():
    W, b, q, cand_h, cand_y, _, _ = _softmax_problem()
    valid = torch.rand(5, 30, generator=torch.Generator().manual_seed(1)) < 0.6
    valid[2] = False
    got = cache_probs(q, cand_h, cand_y, valid, 0.3, 50)
    for i in range(5):
        ref = torch.zeros(50, dtype=torch.float64)
        js = valid[i].nonzero().flatten().tolist()
        if js:
            s = torch.stack([0.3 * q[i] @ cand_h[j] for j in js])
            for j, p in zip(js, torch.softmax(s, 0)):
                ref[cand_y[j]] += p
        assert torch.allclose(got[i], ref, atol=1e-12)


def test_mixture_with_zero_lambdas_is_the_lstm_and_weights_sum_to_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 20, generator=g, dtype=torch.float64)
    has = torch.tensor([True, True, True, False])
    assert torch.equal(mixture_log_probs(logits, None, None, 0.0, 0.0, has), F.log_softmax(logits, -1))
    cache = torch.softmax(torch.randn(4, 20, generator=g, dtype=torch.float64), -1)
    mb = torch.randn(4, 20, generator=g, dtype=torch.float64)
    out = mixture_log_probs(logits, cache, mb, 0.15, 0.1, has).exp()
    ref = 0.75 * logits.softmax(-1) + 0.15 * cache + 0.1 * mb.softmax(-1)
    assert torch.allclose(out[:3], ref[:3]) and torch.allclose(out[3], logits[3].softmax(-1))
    assert torch.allclose(out.sum(-1), torch.ones(4, dtype=torch.float64))


def test_linear_fn():
    p = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
    x = torch.randn(2, 4)
    assert torch.allclose(linear_fn(p, x), F.linear(x, p["weight"], p["bias"]))


def test_ewc_fisher_diagonal_against_per_example_autograd(mnist):
    from trainers.mbpa.classify import ewc_penalty, fisher_diagonal

    x, y = mnist
    torch.manual_seed(0)
    model = MLP(8).double()
    fisher = fisher_diagonal(model, x[:20], y[:20])
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(20):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in model.named_parameters():
            ref[n] += p.grad ** 2 / 20
    assert all(torch.allclose(fisher[n], ref[n], rtol=1e-10, atol=1e-14) for n in ref)
    anchor = {"fisher": fisher, "theta": {n: p.detach() + 0.1 for n, p in model.named_parameters()}}
    expected = 0.5 * 3.0 * sum(float((f * 0.01).sum()) for f in fisher.values())
    assert float(ewc_penalty(model, [anchor], 3.0).detach()) == pytest.approx(expected, rel=1e-9)
