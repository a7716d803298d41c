"""``hpsweep new trainer NAME [--command]``: a working trainer, its sweep file and a test, written
into the current directory; they validate and run as generated.

A Python trainer (``NAME.py``: ``Config``, ``METRICS``, ``train(config, run)``; no import from
hpsweep) fits a line by gradient descent with checkpoints; ``--command`` writes an ordinary
script instead (``NAME.py`` printing ``loss=...`` lines), swept as ``trainer: command``.
"""

from __future__ import annotations

import keyword
from pathlib import Path

from hpsweep.errors import UsageError

__all__ = ["new_trainer", "register"]

_TRAINER = '''"""{name}: a trainer for hpsweep. Fits y = w x + b to noisy points by gradient descent.

Run it alone:   python -m hpsweep.trainer ./{name}.py lr=0.05 steps=50
Sweep it:       hpsweep run {name}.yaml
It imports nothing from hpsweep: `run` is whatever runs it (a sweep's trial, or a local run).
"""

import dataclasses
import random

METRICS = ("loss", "w", "b")          # every metric name train reports


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0                     # each cell's seed arrives here
    lr: float = 0.05
    steps: int = 50
    points: int = 64

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got steps={{self.steps}}")


def train(config, run):
    rng = random.Random(config.seed)
    xs = [rng.uniform(-1, 1) for _ in range(config.points)]
    ys = [2.0 * x - 0.5 + rng.gauss(0, 0.1) for x in xs]
    state = run.load_checkpoint() or {{"step": 0, "w": 0.0, "b": 0.0}}
    w, b = state["w"], state["b"]
    for step in range(state["step"], config.steps):
        errors = [w * x + b - y for x, y in zip(xs, ys)]
        w -= config.lr * 2 * sum(e * x for e, x in zip(errors, xs)) / len(xs)
        b -= config.lr * 2 * sum(errors) / len(xs)
        loss = sum((w * x + b - y) ** 2 for x, y in zip(xs, ys)) / len(xs)
        run.save_checkpoint({{"step": step + 1, "w": w, "b": b}})
        run.report(step + 1, loss=loss, w=w, b=b)
'''

_SWEEP = '''name: {name}
description: {name} over two learning rates and two seeds
trainer: ./{name}.py                  # the file beside this one
config:
  steps: 50
parameters:
  lr: {{grid: [0.01, 0.1]}}
seeds: 2
metric: {{name: loss, mode: min}}
'''

_TEST = '''"""Tests of the {name} trainer, run alone (python -m pytest test_{name}.py)."""

from hpsweep.trainer import LocalRun

from {name} import Config, train


def test_loss_falls_and_a_rerun_resumes(tmp_path):
    run = LocalRun(tmp_path / "run")
    train(Config(steps=20, lr=0.1), run)
    run.close()
    losses = [r["loss"] for r in _reports(tmp_path / "run")]
    assert len(losses) == 20 and losses[-1] < losses[0] / 4

    again = LocalRun(tmp_path / "run")     # the same directory: resumes from its checkpoint
    train(Config(steps=30, lr=0.1), again)
    again.close()
    assert [r["step"] for r in _reports(tmp_path / "run")] == list(range(1, 31))


def _reports(directory):
    import json

    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
'''

_SCRIPT = '''"""{name}: an ordinary program (no hpsweep in it): fits y = w x + b by gradient descent and
prints `step=N loss=X` lines. hpsweep runs it once per cell as `trainer: command`.

Run it alone:   python3 {name}.py --lr 0.05 --steps 50
"""

import argparse
import json
import os
import random

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--seed", type=int, default=0)
args, _ = parser.parse_known_args()

rng = random.Random(args.seed)
xs = [rng.uniform(-1, 1) for _ in range(64)]
ys = [2.0 * x - 0.5 + rng.gauss(0, 0.1) for x in xs]
# a checkpoint where hpsweep keeps one (HPSWEEP_CHECKPOINT_DIR), read back on a resumed attempt
saved = os.path.join(os.environ.get("HPSWEEP_CHECKPOINT_DIR", "."), "state.json")
state = {{"step": 0, "w": 0.0, "b": 0.0}}
if os.environ.get("HPSWEEP_RESUME") and os.path.exists(saved):
    with open(saved) as f:
        state = json.load(f)
w, b = state["w"], state["b"]
for step in range(state["step"], args.steps):
    errors = [w * x + b - y for x, y in zip(xs, ys)]
    w -= args.lr * 2 * sum(e * x for e, x in zip(errors, xs)) / len(xs)
    b -= args.lr * 2 * sum(errors) / len(xs)
    loss = sum((w * x + b - y) ** 2 for x, y in zip(xs, ys)) / len(xs)
    with open(saved, "w") as f:
        json.dump({{"step": step + 1, "w": w, "b": b}}, f)
    print(f"step={{step + 1}} loss={{loss:.6g}}", flush=True)
'''

_COMMAND_SWEEP = '''name: {name}
description: {name}.py, unmodified, over two learning rates and two seeds
trainer: command
config:
  command: [python3, {name}.py]        # run in a directory of its own per cell; sees this one's files
  metrics: ['loss=(?P<loss>[0-9.eE+-]+)']
parameters:
  lr: {{grid: [0.01, 0.1]}}            # reaches the program as --lr VALUE (and --seed SEED)
seeds: 2
metric: {{name: loss, mode: min}}
'''

_COMMAND_TEST = '''"""Tests of {name}.py, run alone (python -m pytest test_{name}.py)."""

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_it_prints_a_falling_loss(tmp_path):
    out = subprocess.run([sys.executable, str(HERE / "{name}.py"), "--lr", "0.1", "--steps", "20"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    losses = [float(m) for m in re.findall(r"loss=([0-9.eE+-]+)", out)]
    assert len(losses) == 20 and losses[-1] < losses[0] / 4
'''


def new_trainer(name: str, directory: Path, command: bool = False) -> list[Path]:
    """Write the trainer (or the script), its sweep file and its test into ``directory``;
    refuses a name that is not a module name and any file that exists already."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise UsageError(f"new trainer {name!r}: the name becomes the module {name}.py: use letters, digits "
                         "and underscores, not starting with a digit (e.g. my_trainer)")
    files = {directory / f"{name}.py": _SCRIPT if command else _TRAINER,
             directory / f"{name}.yaml": _COMMAND_SWEEP if command else _SWEEP,
             directory / f"test_{name}.py": _COMMAND_TEST if command else _TEST}
    there = [str(p) for p in files if p.exists()]
    if there:
        raise UsageError(f"new trainer {name}: {', '.join(there)} exists already; choose another name "
                         "(nothing was written)")
    for path, template in files.items():
        path.write_text(template.format(name=name), encoding="utf-8")
    return list(files)


def _cmd_new(args) -> int:
    written = new_trainer(args.name, Path.cwd(), command=args.command)
    print("wrote " + ", ".join(p.name for p in written))
    sweep = f"{args.name}.yaml"
    print(f"next: hpsweep validate {sweep} && hpsweep run {sweep}   (test: python -m pytest test_{args.name}.py)")
    return 0


def register(subparsers) -> None:
    """``hpsweep new trainer NAME [--command]``."""
    p = subparsers.add_parser("new", help="scaffold a trainer, its sweep file and a test here")
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    t = kinds.add_parser("trainer", help="a trainer NAME.py, NAME.yaml and test_NAME.py")
    t.add_argument("name", metavar="NAME", help="the trainer's module name (my_trainer)")
    t.add_argument("--command", action="store_true",
                   help="an ordinary script swept as `trainer: command` instead of a Python trainer")
    t.set_defaults(func=_cmd_new)
