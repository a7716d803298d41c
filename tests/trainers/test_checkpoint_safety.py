"""No checkpoint the project reads can run code: each is loaded with weights_only=True, and a
pickle with a payload placed where a checkpoint is expected is refused before it runs."""

from __future__ import annotations

import builtins

import pytest
import torch

from hpsweep.trainer.checkpoint import UnsafeCheckpoint, dump_state, load_state
from hpsweep.trainer.run import LocalRun
from hpsweep.trainer.seeding import rng_state, seed_everything, set_rng_state

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


def test_a_plain_pickle_with_a_payload_is_refused_too(tmp_path) -> None:
    """The torch-free format: a file that names any global is refused before it runs."""
    import pickle

    from hpsweep.trainer.checkpoint import PLAIN

    marker = tmp_path / "ran"
    with pytest.raises(UnsafeCheckpoint, match="not allowed"):
        load_state(PLAIN + pickle.dumps({"step": 1, "x": Payload(marker)}))
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpoint, match="not allowed"):   # refused when saved, too
        dump_state({"x": Payload(marker)})
    assert not marker.exists()


def test_a_state_without_tensors_round_trips_without_torch(tmp_path) -> None:
    """A trainer that never imports torch saves and loads its checkpoints without it."""
    import subprocess
    import sys

    code = ("import sys, random\n"
            "from hpsweep.trainer.checkpoint import dump_state, load_state\n"
            "state = {'step': 7, 'w': [0.5, -1.0], 'rng': random.getstate(), 'b': b'x', 'n': None}\n"
            "back = load_state(dump_state(state))\n"
            "assert back == state, back\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    # a tensor anywhere in the state takes the torch format, which loads back as it was
    state = {"step": 1, "deep": [{"t": torch.arange(3)}]}
    data = dump_state(state)
    assert data[:2] == b"PK"
    assert torch.equal(load_state(data)["deep"][0]["t"], torch.arange(3))
