"""The sleep trainer's loop: it sleeps instead of training (see the package docstring)."""

from __future__ import annotations

import os
import time

from trainers.sleep.config import Config

__all__ = ["InjectedFailure", "train"]


class InjectedFailure(RuntimeError):
    """Raised on purpose by ``fail_at``."""


def train(config: Config, run) -> None:
    state = run.load_checkpoint() or {"step": 0}
    if config.starts_dir:
        os.makedirs(config.starts_dir, exist_ok=True)
        with open(os.path.join(config.starts_dir, f"x={config.x},seed={config.seed}"), "a") as f:
            f.write(f"{state['step']}\n")
    wobble = ((config.seed * 7919) % 100) / 1000.0
    for step in range(state["step"], config.reports):
        if step == config.fail_at:
            raise InjectedFailure(f"fail_at={config.fail_at}: failing on purpose at report {step}")
        time.sleep(config.sleep)
        loss = config.x ** 2 + 1.0 / (step + 1) + wobble
        extra = {f"extra/{i}": loss * i for i in range(config.extra_metrics)}
        run.save_checkpoint({"step": step + 1})
        run.report(step + 1, loss=loss, score=-loss, **extra)
