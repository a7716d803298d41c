"""The SnAp trainer learns: slow checks on the real tasks (seconds each, unloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpsweep.trainer.run import LocalRun
from trainers.snap import Config, train

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("HPSWEEP_SHARED_DATA", ROOT / ".." / "shared" / "data"))
ENWIKI = SHARED / "enwiki" / "enwiki-sample.xml.bz2"
pytestmark = pytest.mark.slow


def final(config: Config, out: Path) -> dict:
    run = LocalRun(out, device=torch.device("cpu"))
    try:
        train(config, run)
    finally:
        run.close()
    return run.history[-1]


@pytest.mark.parametrize("method", ["bptt", "snap1", "uoro"])
def test_copy_curriculum_grows(method, tmp_path):
    row = final(Config(task="copy", method=method, hidden=16, steps=800, eval_every=400, lr=0.01,
                       threads=1), tmp_path)
    assert row["curriculum/length"] >= 3


@pytest.mark.parametrize("method", ["bptt", "snap1"])
def test_charlm_learns_bytes(method, tmp_path):
    row = final(Config(task="charlm", data=str(ENWIKI), method=method, hidden=32, sparsity=0.75,
                       batch=8, seq_len=32, window=32, steps=120, eval_every=60, eval_batches=4,
                       lr=0.01, threads=1), tmp_path)
    assert row["valid/bpc"] < 5.5  # uniform over bytes is 8 bits
    assert row["test/bpc"] < 5.5


def test_command_line_runs_and_resumes(tmp_path):
    args = [sys.executable, "-m", "trainers.snap", "task=copy", "method=snap2", "hidden=8", "batch=4",
            "steps=4", "eval_every=2", "threads=1", "--out", str(tmp_path)]
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "curriculum/length" in first.stdout
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0  # the checkpoint is at step 4 already: nothing more to do
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    bad = subprocess.run(args[:3] + ["method=snapx"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "snapN" in bad.stderr and "Traceback" not in bad.stderr
