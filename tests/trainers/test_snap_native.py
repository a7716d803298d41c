"""SnAp-1's C loops (:mod:`trainers.snap.native`) against its eager torch path and dense products.

The eager path is itself checked against autograd in ``test_snap_gradients.py`` (SnAp-1 equals
BPTT on networks without coupling); here every native piece must give the eager result: float64
to rounding (sums over examples run in a different order), float32 to float32 precision.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from trainers.snap import SparseRNN, native, sequence_gradient, snap1
from trainers.snap.influence import Online

DT = torch.float64


def rel_err(a: dict, b: dict) -> float:
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b) ** 0.5
    den = sum((b[k].double() ** 2).sum() for k in b) ** 0.5
    return float(num / den)


def problem(cell: str, density: float, B: int, hidden: int = 7, T: int = 12, seed: int = 0, dtype=DT):
    model = SparseRNN(cell, 6, hidden, 5, density=density, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # coupled units, gates away from their defaults
        model.U.mul_(3.0)
        model.b.add_(0.3 * torch.randn(model.b.shape, generator=g, dtype=dtype))
    x = F.one_hot(torch.randint(0, 6, (T, B), generator=g), 6).to(dtype)
    y = torch.randint(0, 5, (T, B), generator=g)
    y[0] = -1  # no loss at all at the first step
    y[5, : B // 2 + 1] = -1  # and some ignored targets
    return model, x, y


def run(model: SparseRNN, x, y, *, window: int = 5, steps: slice = slice(None), online: Online | None = None,
        state=None):
    """Steps of ``x`` with influence resets every ``window``: ``(online, state)``."""
    T, B = y.shape
    online = online or Online(model, "snap1", B)
    weights = (y >= 0).to(x.dtype) / (y >= 0).sum().clamp(min=1)
    s = model.initial_state(B) if state is None else state
    eff = model.effective()
    for t in range(T)[steps]:
        if t % window == 0:
            online.reset_influence()
        s, _ = online.step(x[t], s, y[t], weights[t], eff, has_loss=bool((weights[t] != 0).any()))
    return online, s


@pytest.fixture
def lib():
    """The compiled loops; where no C compiler exists, SnAp-1 must fall back to eager instead."""
    compiled = native.library()
    if shutil.which("cc") or shutil.which("gcc"):
        assert compiled is not None
    return compiled


def eager(monkeypatch):
    monkeypatch.setattr(snap1, "NATIVE", False)


CASES = ([(cell, density, B) for cell in ("gru", "lstm") for density in (1.0, 0.4) for B in (3, 16)]
         + [("lstm", 0.4, 8), ("gru", 0.4, 32)])


@pytest.mark.parametrize("pattern", ["jacobian", "unit"])
@pytest.mark.parametrize("cell,density,B", CASES)
def test_native_equals_eager(cell, density, B, pattern, lib, monkeypatch):
    """Gradients (and the influence left at the end) of the C loops equal the eager path's,
    through windows, steps without a loss and ignored targets; batch 3 runs the generic loop,
    8, 16, 32 their vectorised ones; both of SnAp's patterns (they differ on the LSTM)."""
    monkeypatch.setattr(snap1, "GRU_DELAY", 1)  # the dense GRU too (it keeps delayed updates otherwise)
    model, x, y = problem(cell, density, B)
    fast, _ = run(model, x, y, online=Online(model, "snap1", B, pattern=pattern))
    assert (fast.snap1.native is not None) == (lib is not None)
    eager(monkeypatch)
    slow, _ = run(model, x, y, online=Online(model, "snap1", B, pattern=pattern))
    assert slow.snap1.native is None and slow._native is None
    assert rel_err(fast.gradients(), slow.gradients()) < 1e-12
    assert torch.allclose(fast.influence(), slow.influence(), rtol=1e-12, atol=1e-15)
    assert rel_err(fast.gradients(), sequence_gradient(model, x, y, "rtrl", window=5)) > 1e-3  # not vacuous


@pytest.mark.parametrize("B", [3, 16])
def test_native_cell_feeds_the_delayed_dense_gru(B, lib, monkeypatch):
    """The dense GRU keeps its eager delayed influence update behind the C forward step."""
    monkeypatch.setattr(snap1, "GRU_DELAY", 3)
    model, x, y = problem("gru", 1.0, B)
    fast, _ = run(model, x, y)
    assert fast.snap1.native is None and (fast._native is not None) == (lib is not None)
    eager(monkeypatch)
    slow, _ = run(model, x, y)
    assert slow._native is None
    assert rel_err(fast.gradients(), slow.gradients()) < 1e-12
    assert torch.allclose(fast.influence(), slow.influence(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_native_float32_matches_float64(cell, lib, monkeypatch):
    model64, x, y = problem(cell, 0.4, 16, hidden=20, T=30)
    model32 = SparseRNN(cell, 6, 20, 5, density=0.4, seed=0, dtype=torch.float32)
    model32.load_state_dict(model64.state_dict())
    eager(monkeypatch)
    reference = run(model64, x, y)[0].gradients()
    monkeypatch.setattr(snap1, "NATIVE", True)
    online = run(model32, x.float(), y)[0]
    assert (online.snap1.native is not None) == (lib is not None)
    assert rel_err(online.gradients(), reference) < 1e-5


def test_native_threads_split_units_exactly(lib, monkeypatch):
    """Several threads run disjoint units: the same numbers as one thread."""
    model, x, y = problem("lstm", 0.4, 16, hidden=13)
    one = run(model, x, y)[0].gradients()
    monkeypatch.setattr(snap1, "NATIVE_ENTRIES_PER_THREAD", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        several = run(model, x, y)[0].gradients()
    finally:
        torch.set_num_threads(threads)
    for name in one:
        assert torch.equal(one[name], several[name]), name


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_native_checkpoint_moves_between_layouts(cell, lib, monkeypatch):
    """The C loops store J unit-major; a checkpoint written by either path resumes in the other."""
    model, x, y = problem(cell, 0.4, 16, T=10)
    first, s = run(model, x, y, window=100, steps=slice(0, 6))
    state = first.state_dict()
    first.zero_grad()
    run(model, x, y, window=100, steps=slice(6, None), online=first, state=s)
    eager(monkeypatch)
    second = Online(model, "snap1", 16)
    second.load_state_dict(state)
    run(model, x, y, window=100, steps=slice(6, None), online=second, state=s)
    assert rel_err(first.gradients(), second.gradients()) < 1e-12
    assert torch.allclose(first.influence(), second.influence(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("B", [3, 16])
def test_native_csr_product(B, lib):
    if lib is None:
        return  # checked by the fixture: no compiler on this machine
    g = torch.Generator().manual_seed(0)
    rows, k, columns = 10, 5, 9
    cols = torch.stack([torch.randperm(columns, generator=g)[:k] for _ in range(rows)])
    values = torch.randn(rows, k, generator=g, dtype=DT)
    src = torch.randn(columns, B, generator=g, dtype=DT)
    out = torch.empty(rows, B, dtype=DT)
    native.csr(lib, values.flatten(), cols.flatten().to(torch.int32), src, out)
    dense = torch.zeros(rows, columns, dtype=DT).scatter_(1, cols, values)
    assert torch.allclose(out, dense @ src, rtol=1e-13, atol=1e-14)
