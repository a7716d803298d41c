"""One contract test over every registered trainer: the same checks for each plug-in.

- its Config is a frozen dataclass with a ``seed`` field whose defaults construct;
- ``train`` reports only the metrics it declares (and at least one);
- a fixed seed gives the same numbers twice; another seed gives others;
- a checkpoint round-trips: a run stopped right after a report and resumed from its
  checkpoint ends with the same metrics as a run that was never stopped.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from hpsweep.trainer.config import build_config
from hpsweep.trainer.registry import entry_points, load_trainer
from hpsweep.trainer.run import LocalRun

SHARED = Path(os.environ.get("HPSWEEP_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
CPU = torch.device("cpu")
#: the built-in trainers (trainers/ and command), as registered through the entry-point group hpsweep.trainers
TRAINERS = entry_points()

#: the command trainer's source directory: empty (removed when the session ends)
_EMPTY = tempfile.TemporaryDirectory(prefix="hpsweep-contract-")

# A tiny configuration of each registered trainer: seconds on a CPU.
TINY: dict[str, list[dict]] = {
    "sleep": [{"reports": 4, "sleep": 0.0, "extra_metrics": 2, "x": 0.5}],
    "snap": [
        {"task": "copy", "method": "snap1", "cell": "gru", "hidden": 8, "batch": 4, "steps": 40,
         "eval_every": 10, "threads": 1},
        {"task": "charlm", "method": "snap2", "cell": "lstm", "hidden": 8, "batch": 2, "steps": 12,
         "sparsity": 0.75, "window": 4, "seq_len": 8, "eval_every": 4, "eval_batches": 1, "threads": 1,
         "data": str(SHARED / "enwiki" / "enwiki-sample.xml.bz2")},
    ],
    "mbpa": [
        {"experiment": "permuted_mnist", "method": "mbpa", "data_dir": str(SHARED / "mnist"),
         "num_tasks": 2, "train_per_task": 64, "valid_per_task": 32, "test_per_task": 32,
         "batch_size": 16, "hidden": 16, "memory_size": 128, "neighbours": 8, "fisher_samples": 16,
         "report_every": 2},
    ],
    # a program printing a seeded loss, keeping its step in its checkpoint directory
    "command": [{"command": [sys.executable, "-c", """
import argparse, json, os, random, time
a = argparse.ArgumentParser(); a.add_argument("--seed", type=int); a.add_argument("--n", type=int)
args = a.parse_args()
ckpt = os.path.join(os.environ["HPSWEEP_CHECKPOINT_DIR"], "state.json")
state = json.load(open(ckpt)) if os.environ.get("HPSWEEP_RESUME") == "1" else {"step": 0, "rng": args.seed}
rng = random.Random(state["rng"])
for step in range(state["step"] + 1, args.n + 1):
    print(f"step={step} loss={rng.random():.6f}", flush=True)
    json.dump({"step": step, "rng": rng.randint(0, 1 << 30)}, open(ckpt + ".tmp", "w"))
    os.replace(ckpt + ".tmp", ckpt)
    rng = random.Random(json.load(open(ckpt))["rng"])
    time.sleep(0.1)
"""], "n": 8, "workdir": _EMPTY.name}],
}


class StopAfter(LocalRun):
    """Dies right after its ``n``-th report that follows a saved checkpoint, as a killed trial
    would (a Python trainer saves before each report; a command trainer's checkpoint directory
    is saved after the report it goes with, once the output already printed is read)."""

    class Stop(Exception):
        pass

    def __init__(self, out: Path, n: int) -> None:
        super().__init__(out, device=CPU)
        self.n = n
        self.saved = False

    def save_checkpoint(self, state: dict) -> None:
        super().save_checkpoint(state)
        self.saved = True

    def report(self, step, **metrics):
        super().report(step, **metrics)
        if len(self.history) >= self.n and self.saved:
            raise self.Stop


def cases():
    return [(name, i) for name in sorted(TRAINERS) for i in range(len(TINY.get(name, [{}])))]


def test_every_registered_trainer_has_a_tiny_config() -> None:
    assert sorted(TINY) == sorted(TRAINERS)


def _run(info, values: dict, out: Path) -> list[dict]:
    config, problems = build_config(info.Config, values)
    assert not problems, problems
    run = LocalRun(out, device=CPU)
    info.train(config, run)
    run.close()
    return run.history


def _numbers(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time" and not k.startswith("perf/")} for row in history]


@pytest.mark.parametrize("name, i", cases())
def test_trainer_contract(name: str, i: int, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    info = load_trainer(name, {**TINY[name][i], "seed": 0})
    assert dataclasses.is_dataclass(info.Config) and info.Config.__dataclass_params__.frozen
    assert "seed" in {f.name for f in dataclasses.fields(info.Config)}
    values = TINY[name][i]

    first = _run(info, {**values, "seed": 3}, tmp_path / "a")
    assert first, "train() reported nothing"
    reported = {k for row in first for k in row if k not in ("step", "time")}
    undeclared = [k for k in reported if not info.reports(k)]
    assert not undeclared, f"{name} reports metrics it does not declare: {undeclared}"

    again = _run(info, {**values, "seed": 3}, tmp_path / "b")
    assert _numbers(again) == _numbers(first), "the same seed gave different numbers"
    other = _run(info, {**values, "seed": 4}, tmp_path / "c")
    assert _numbers(other) != _numbers(first), "another seed gave the same numbers"

    if len(first) >= 2:
        config, _ = build_config(info.Config, {**values, "seed": 3})
        stopped = StopAfter(tmp_path / "d", 1)
        with pytest.raises(StopAfter.Stop):
            info.train(config, stopped)
        stopped.close()
        resumed = LocalRun(tmp_path / "d", device=CPU)
        assert resumed.load_checkpoint() is not None, "no checkpoint saved before the first report"
        info.train(config, resumed)
        resumed.close()
        tail = _numbers(resumed.history)
        assert tail and tail[-1] == _numbers(first)[-1], (tail[-1:], _numbers(first)[-1:])
