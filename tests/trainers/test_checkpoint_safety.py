"""No checkpoint the project reads can run code: each is loaded with weights_only=True, and a
pickle with a payload placed where a checkpoint is expected is refused before it runs."""

from __future__ import annotations

import builtins

import pytest
import torch

from trainers.common.run import LocalRun, UnsafeCheckpoint, dump_state, load_state
from trainers.common.seeding import rng_state, seed_everything, set_rng_state

CPU = torch.device("cpu")


class Payload:
    """Unpickling this creates the marker file: the proof that code ran."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _evil(marker) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"step": 1, "x": Payload(marker)}, buffer)
    return buffer.getvalue()


def test_the_payload_does_run_without_weights_only(tmp_path) -> None:
    """The test's own check: an unsafe load of this file does create the marker."""
    import io

    marker = tmp_path / "ran"
    torch.load(io.BytesIO(_evil(marker)), weights_only=False)
    assert marker.exists()


def test_local_run_checkpoint_is_refused(tmp_path) -> None:
    marker = tmp_path / "ran"
    run = LocalRun(tmp_path / "out", device=CPU)
    (tmp_path / "out" / "checkpoint.pt").write_bytes(_evil(marker))
    with pytest.raises(UnsafeCheckpoint, match="refused to load"):
        run.load_checkpoint()
    run.close()
    assert not marker.exists()


def test_sweep_checkpoint_bytes_are_refused(tmp_path) -> None:
    """The engine's Run reads the cell checkpoint from storage as bytes, then load_state."""
    marker = tmp_path / "ran"
    with pytest.raises(UnsafeCheckpoint):
        load_state(_evil(marker))
    assert not marker.exists()


def test_mbpa_lm_checkpoint_is_refused(tmp_path) -> None:
    from trainers.mbpa.lm import load_model

    marker = tmp_path / "ran"
    model_file = tmp_path / "model.pt"
    model_file.write_bytes(_evil(marker))
    with pytest.raises(UnsafeCheckpoint, match="lm_checkpoint"):
        load_model(LocalRun(tmp_path / "out", device=CPU), str(model_file), None, CPU)
    assert not marker.exists()


def test_a_real_checkpoint_with_every_rng_state_round_trips() -> None:
    seed_everything(5)
    state = {"step": 3, "w": torch.randn(4), "rng": rng_state(), "nested": {"a": [1, 2.5, "s", None]}}
    import random

    import numpy as np

    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    back = load_state(dump_state(state))
    set_rng_state(back["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert back["step"] == 3 and torch.equal(back["w"], state["w"]) and back["nested"] == state["nested"]
