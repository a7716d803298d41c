"""MbPA on real MNIST: in a short continual run it keeps more of the first task than plain SGD."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hpsweep.trainer.run import LocalRun
from trainers.mbpa import Config, train

DATA = Path(os.environ.get("HPSWEEP_SHARED_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))


@pytest.mark.slow
def test_mbpa_keeps_more_of_the_first_task_than_sgd(tmp_path):
    torch.set_num_threads(1)
    base = dict(experiment="permuted_mnist", data_dir=str(DATA / "mnist"), num_tasks=3, train_per_task=2000,
                valid_per_task=0, test_per_task=300, hidden=100, memory_size=10000, neighbours=16, steps=1,
                alpha=0.1, keys="pixels")
    first, mean = {"sgd": [], "mbpa": []}, {"sgd": [], "mbpa": []}
    for seed in (0, 1, 2):
        for method in ("sgd", "mbpa"):
            run = LocalRun(tmp_path / f"{method}-{seed}", device=torch.device("cpu"))
            train(Config(**base, method=method, seed=seed, split=seed), run)
            first[method].append(run.history[-1]["acc/task_0"])
            mean[method].append(run.history[-1]["acc/mean"])
    avg = {m: sum(v) / len(v) for m, v in first.items()}
    figures = (f"first-task test accuracy after 3 tasks, seeds 0-2: sgd {first['sgd']} (mean {avg['sgd']:.3f}), "
               f"mbpa {first['mbpa']} (mean {avg['mbpa']:.3f}); mean over tasks: sgd {mean['sgd']}, "
               f"mbpa {mean['mbpa']}")
    print(figures)
    assert avg["mbpa"] > avg["sgd"] + 0.03, figures
    assert sum(mean["mbpa"]) > sum(mean["sgd"]), figures
