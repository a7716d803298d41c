"""The sleep trainer's configuration and metrics (no torch: validating a sweep imports this alone)."""

from __future__ import annotations

import dataclasses

__all__ = ["Config", "METRICS"]

METRICS = ("loss", "score", "extra/*")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    x: float = 0.0               # the "hyperparameter": loss is smallest at x = 0
    reports: int = 5             # number of run.report calls
    sleep: float = 0.2           # seconds slept before each report
    extra_metrics: int = 0       # additional metrics a report carries (extra/0 ...)
    fail_at: int = -1            # raise at this report (>= 0), to test retries
    starts_dir: str = ""         # when set, every start is appended to a file per cell there

    def __post_init__(self) -> None:
        if self.reports < 1:
            raise ValueError(f"reports must be >= 1, got reports={self.reports}")
        if self.sleep < 0:
            raise ValueError(f"sleep must be >= 0, got sleep={self.sleep}")
