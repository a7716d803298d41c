"""The SnAp trainer's configuration; defaults are the paper's character-level LM settings.

No torch here: validating a sweep imports this module alone.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Literal

from hpsweep.trainer.config import DataPath

__all__ = ["Config", "METRICS", "parse_method"]

_SNAP = re.compile(r"snap([1-9][0-9]*)")


def parse_method(method: str) -> tuple[str, int]:
    """``"bptt" | "rtrl" | "uoro" | "snapN"`` (N >= 1) -> ``(kind, N)`` (N = 0 unless snap)."""
    if method in ("bptt", "rtrl", "uoro"):
        return method, 0
    m = _SNAP.fullmatch(method)
    if m is None:
        raise ValueError(f"method must be bptt, rtrl, uoro or snapN with N >= 1 (snap1, snap2, ...), got {method!r}")
    return "snap", int(m.group(1))

#: what ``train`` reports (fnmatch patterns allowed)
METRICS = (
    "train/bpc",          # bits per character, mean over the training steps since the last report
    "valid/bpc",          # charlm: held-out bytes; copy: a fresh batch at the current length
    "test/bpc",           # charlm, at the end when ``test`` is set
    "curriculum/length",  # copy: the pattern length reached
    "perf/steps_per_sec",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """SnAp trainer options (Menick et al., ICLR 2021).

    ``method``: ``bptt`` (truncated every ``window`` steps), ``rtrl``, ``snap1``, ``snap2``,
    ``snapN`` for any N >= 1, ``uoro``. ``sparsity``: the fraction of every weight matrix fixed
    at zero (the paper: 0, 0.75, 0.9, 0.98). A training step is one batch of sequences
    (charlm: random crops of ``seq_len`` bytes; copy: patterns at the curriculum's length),
    processed in windows of ``window`` steps with the state carried across windows; BPTT
    updates at every window end, the online methods every ``update_every`` time steps
    (None: at every window end too).
    """

    seed: int = 0
    task: Literal["copy", "charlm"] = "charlm"
    method: str = "snap1"
    snap_pattern: Literal["jacobian", "unit"] = "jacobian"  # SnAp-n's kept entries (LSTM); see influence.py
    cell: Literal["gru", "lstm"] = "gru"
    hidden: int = 128
    sparsity: float = 0.0
    lr: float = 10 ** -3
    batch: int = 16
    steps: int = 100_000
    window: int = 128
    update_every: int | None = None
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    # charlm
    data: Annotated[str | None, DataPath] = None  # text file (.bz2/.gz read directly) or directory of *train*,
                                      # *valid*, *test* files; local path or s3:// URI (prefix/)
    seq_len: int = 128                # length of the random crops
    valid_fraction: float = 0.05      # the bytes' last 2 x this fraction: valid, then test
    eval_batches: int = 8             # held-out batches per evaluation
    test: bool = True                 # report test/bpc at the end
    # copy task curriculum
    curriculum_threshold: float = 0.15  # bits per char: grow the length when the recent mean is below
    curriculum_window: int = 20         # "recent": the last this many training steps
    max_length: int = 512
    # bookkeeping
    eval_every: int = 1000
    dtype: Literal["float32", "float64"] = "float32"
    threads: int = 0                  # torch CPU threads (0: leave as is)

    def __post_init__(self) -> None:
        parse_method(self.method)  # raises ValueError with the accepted forms
        problems = []
        for name in ("hidden", "batch", "steps", "window", "seq_len", "eval_every", "eval_batches",
                     "curriculum_window", "max_length"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {name}={getattr(self, name)}")
        if self.snap_pattern not in ("jacobian", "unit"):
            problems.append(f"snap_pattern must be jacobian or unit, got snap_pattern={self.snap_pattern!r}")
        if not 0.0 <= self.sparsity < 1.0:
            problems.append(f"sparsity must be in [0, 1), got sparsity={self.sparsity}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got lr={self.lr}")
        if self.update_every is not None and self.update_every < 1:
            problems.append(f"update_every must be >= 1 or None, got update_every={self.update_every}")
        if self.update_every is not None and self.method == "bptt":
            problems.append("update_every applies to online methods; bptt updates at every window end")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            problems.append(f"beta1, beta2 must be in [0, 1), got beta1={self.beta1} beta2={self.beta2}")
        if not 0 < self.valid_fraction < 0.5:
            problems.append(f"valid_fraction must be in (0, 0.5), got valid_fraction={self.valid_fraction}")
        if self.curriculum_threshold <= 0:
            problems.append(f"curriculum_threshold must be > 0 bits, got {self.curriculum_threshold}")
        if self.threads < 0:
            problems.append(f"threads must be >= 0, got threads={self.threads}")
        if self.task == "charlm" and not self.data:
            problems.append("task=charlm needs data=PATH (a text file, .bz2 allowed, local or s3://)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity
