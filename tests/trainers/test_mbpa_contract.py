"""The trainer contract for mbpa: every experiment/method runs at tiny size, reports only declared
metrics, is deterministic for a fixed seed, and resumes from a checkpoint exactly where it left off."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from hpsweep.trainer.config import build_config
from hpsweep.trainer.registry import load_trainer
from hpsweep.trainer.run import LocalRun
from trainers.mbpa import Config, train

DATA = Path(os.environ.get("HPSWEEP_SHARED_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
CPU = torch.device("cpu")

MNIST = dict(data_dir=str(DATA / "mnist"), hidden=16, train_per_task=300, valid_per_task=50, test_per_task=100,
             neighbours=8, steps=2, alpha=0.1, memory_size=1000, fisher_samples=50, batch_size=32)
CASES = {
    "permuted-sgd": dict(MNIST, experiment="permuted_mnist", method="sgd", num_tasks=3),
    "permuted-ewc": dict(MNIST, experiment="permuted_mnist", method="ewc", num_tasks=3),
    "permuted-mbpa": dict(MNIST, experiment="permuted_mnist", method="mbpa", num_tasks=3),
    "incremental-sgd": dict(MNIST, experiment="incremental", method="sgd", incremental_updates=6, eval_every=2,
                            new_class_fraction=0.2),
    "incremental-mbpa": dict(MNIST, experiment="incremental", method="mbpa", incremental_updates=6, eval_every=2,
                             local_optimizer="rmsprop"),
    "lm": dict(experiment="lm", data_dir=str(DATA / "brown"), lm_prefix="brown", lm_train_tokens=3000,
               lm_eval_tokens=300, lm_embed=8, lm_hidden=8, lm_layers=1, lm_batch=4, lm_bptt=10, lm_epochs=2,
               lm_max_steps=8, report_every=3, memory_size=100, neighbours=16, lm_eval_chunk=32),
}
EXPECTED = {
    "permuted": {"acc/task_0", "acc/task_1", "acc/task_2", "acc/mean", "valid/acc_mean", "train/loss"},
    "incremental": {"acc/old", "acc/new", "acc/all"},
    "lm": {"valid/ppl", "test/ppl", "valid/ppl_lstm", "test/ppl_lstm", "train/loss"},
}


class Interrupted(RuntimeError):
    pass


class StopAfter(LocalRun):
    """A LocalRun that dies right after its n-th report (the checkpoint is already saved)."""

    def __init__(self, out, n):
        super().__init__(out, device=CPU)
        self.n = n

    def report(self, step, **metrics):
        super().report(step, **metrics)
        if len(self.history) == self.n:
            raise Interrupted


def _run(tmp_path, name, values, out="run"):
    run = LocalRun(tmp_path / out, device=CPU, outputs_dir=tmp_path / "outputs")
    train(Config(**values), run)
    run.close()
    return [{k: v for k, v in row.items() if k != "time"} for row in run.history]


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_runs_reports_declared_metrics_deterministic_and_resumes(tmp_path, name):
    info = load_trainer("mbpa")
    values = CASES[name]
    full = _run(tmp_path, name, values, "a")
    names = {k for row in full for k in row if k != "step"}
    assert all(info.reports(k) for k in names), sorted(k for k in names if not info.reports(k))
    assert EXPECTED[name.split("-")[0]] <= names, names
    assert all(v == v for row in full for v in row.values())   # no NaN
    assert _run(tmp_path, name, values, "b") == full            # fixed seed: same numbers
    cut = 2 if len(full) > 2 else 1
    with pytest.raises(Interrupted):
        train(Config(**values), StopAfter(tmp_path / "c", cut))
    resumed = LocalRun(tmp_path / "c", device=CPU)
    train(Config(**values), resumed)
    assert [{k: v for k, v in r.items() if k != "time"} for r in resumed.history] == full[cut:]


def test_seed_changes_the_numbers_and_prediction_never_trains(tmp_path):
    values = CASES["permuted-mbpa"]
    mbpa = _run(tmp_path, "x", values, "a")
    assert mbpa != _run(tmp_path, "x", dict(values, seed=1), "b")
    sgd = _run(tmp_path, "x", dict(values, method="sgd"), "c")
    # MbPA's predictions after each task leave theta alone: training is the very same as sgd's
    assert [r["train/loss"] for r in mbpa] == [r["train/loss"] for r in sgd]
    assert [r["acc/task_0"] for r in mbpa] != [r["acc/task_0"] for r in sgd]


def test_lm_two_stages_match_one_stage(tmp_path):
    values = CASES["lm"]
    model_file = tmp_path / "outputs" / "models" / "lstm-0.pt"   # run.output: the outputs dir
    one = _run(tmp_path, "lm", values, "one")[-1]
    stage1 = _run(tmp_path, "lm", dict(values, train_only=True, save_model_to="models/lstm-{seed}.pt"), "s1")
    assert model_file.exists() and (tmp_path / "s1" / "artifacts" / "lstm-0.pt").exists()
    assert "valid/ppl_lstm" in stage1[-1] and "valid/ppl" not in stage1[-1]
    two = _run(tmp_path, "lm", dict(values, lm_checkpoint="output:models/lstm-{seed}.pt"), "s2")
    assert len(two) == 1
    for key in ("valid/ppl", "test/ppl", "valid/ppl_lstm", "test/ppl_lstm"):
        assert two[0][key] == pytest.approx(one[key], rel=1e-6), key
    assert one["valid/ppl"] != one["valid/ppl_lstm"]


def test_lm_model_file_per_seed(tmp_path):
    """``{seed}`` in save_model_to / lm_checkpoint: one LSTM per seed, each stage-2 run loads its own."""
    values = CASES["lm"]
    for seed in (0, 1):
        _run(tmp_path, "lm", dict(values, seed=seed, train_only=True, save_model_to="models/lstm-{seed}.pt"),
             f"s1-{seed}")
    outputs = tmp_path / "outputs" / "models"
    assert (outputs / "lstm-0.pt").exists() and (outputs / "lstm-1.pt").exists()
    two = [_run(tmp_path, "lm", dict(values, seed=seed, lm_checkpoint="output:models/lstm-{seed}.pt"),
                f"s2-{seed}")[0] for seed in (0, 1)]
    one = [_run(tmp_path, "lm", dict(values, seed=seed), f"one-{seed}")[-1] for seed in (0, 1)]
    for a, b in zip(two, one):
        assert a["test/ppl_lstm"] == pytest.approx(b["test/ppl_lstm"], rel=1e-6)
    assert two[0]["test/ppl_lstm"] != two[1]["test/ppl_lstm"]


def test_config_validation_messages(tmp_path):
    _, problems = build_config(Config, {"alpha": -1.0, "neighbours": 0})
    assert problems and "alpha must be >= 0, got alpha=-1.0" in problems[0].message
    assert "neighbours must be >= 1" in problems[0].message
    _, problems = build_config(Config, {"lambda_cache": 0.6, "lambda_mbpa": 0.5})
    assert "lambda_cache + lambda_mbpa <= 1" in problems[0].message
    _, problems = build_config(Config, {"experiment": "incremental", "method": "ewc"})
    assert "only for experiment=permuted_mnist" in problems[0].message
    _, problems = build_config(Config, {"experiment": "lm", "train_only": True, "lm_checkpoint": "x.pt"})
    assert "leave lm_checkpoint unset" in problems[0].message
    _, problems = build_config(Config, {"nieghbours": 3})
    assert "did you mean 'neighbours'" in problems[0].message
    with pytest.raises(ValueError, match="data_dir is required"):
        train(Config(), LocalRun(tmp_path, device=CPU))
    assert dataclasses.fields(Config)[0].name == "seed"
