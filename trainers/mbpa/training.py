"""``train(config, run)``: dispatch to the experiment's loop."""

from __future__ import annotations

from trainers.mbpa.config import METRICS, Config

__all__ = ["train", "METRICS"]


def train(config: Config, run) -> None:
    """Run one MbPA experiment, reporting through ``run`` and resuming from its checkpoint."""
    if config.experiment == "permuted_mnist":
        from trainers.mbpa.classify import train_permuted

        train_permuted(config, run)
    elif config.experiment == "incremental":
        from trainers.mbpa.classify import train_incremental

        train_incremental(config, run)
    else:
        from trainers.mbpa.lm import train_lm

        train_lm(config, run)
