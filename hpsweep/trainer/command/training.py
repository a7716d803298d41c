"""The command trainer's loop: the program run once per cell, its output read as it comes.

For each cell: a fresh directory (``HPSWEEP_CELL_DIR``, the working directory, mirroring the
source: :mod:`.cell`), the checkpoint directory restored from the cell's checkpoint when there
is one (``HPSWEEP_RESUME=1``), the program started in a process group of its own
(:mod:`.process`), its output (stdout and stderr together) parsed line by line
(:mod:`.output`) and written whole to ``output.log``, kept as an artifact of the cell's run.

Checkpoints ride with reports, as a Python trainer's do. When a report line comes and the
checkpoint directory changed, its files are read, then the output already on the pipe is read
and reported, and only then is the state saved (it goes out with the next report). A program
that prints a step's line before it writes that step's checkpoint (the usual order: log, then
save; a file replaced by a rename, never written in place) thus never has a checkpoint stored
ahead of its metrics. The state holds the match counts too, so that counted steps go on where
they were; a program that resumes should still print its step (``step=N``, a ``step`` group).
"""

from __future__ import annotations

import collections
import os
import selectors
import shutil
import tempfile
import time
from pathlib import Path

from hpsweep.trainer.command.cell import CheckpointDir, mirror
from hpsweep.trainer.command.config import argv, declared, resolve_program
from hpsweep.trainer.command.output import JsonLines, LineParser
from hpsweep.trainer.command.process import start, stop_group

__all__ = ["train", "CommandFailed", "MetricNeverSeen", "TAIL_LINES"]

TAIL_LINES = 15
_POLL_S = 0.2         # how often the metrics file is read while the program is quiet
_CHECK_S = 0.2        # how often a report looks whether the checkpoint directory changed
_DRAIN_BYTES = 1 << 20   # more than a pipe holds (64 KiB on Linux unless enlarged)


class CommandFailed(RuntimeError):
    """The program exited with a non-zero status (a retry may help: the sweep's ``retries``);
    ``tail``: its last lines of output."""

    def __init__(self, message: str = "", tail: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.tail = tuple(tail)


class MetricNeverSeen(CommandFailed, ValueError):
    """The program ended without printing a metric it declares: a retry cannot help."""


class _Reporter:
    """Reports to ``run``, with the checkpoint directory's state saved along (see the module)."""

    def __init__(self, run, ckpt: CheckpointDir, parser: LineParser, jsonl: JsonLines, attempt: int) -> None:
        self.run, self.ckpt, self.parser, self.jsonl = run, ckpt, parser, jsonl
        self.attempt = attempt
        self.next_check = 0.0
        self.files: dict | None = None   # read from the directory, saved after the pipe is drained

    def report(self, step: int, values: dict[str, float]) -> None:
        self.run.report(step, **values)
        if self.files is not None:
            return
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + _CHECK_S
            if self.ckpt.changed():
                self.files = self.ckpt.snapshot()   # saved once the pipe is drained (_pump)

    def save(self) -> None:
        if self.files is None:
            return
        self.run.save_checkpoint({"files": self.files, "counts": dict(self.parser.counts),
                                  "json_count": self.jsonl.count, "attempt": self.attempt,
                                  "seen": sorted(self.parser.seen | self.jsonl.seen)})
        self.files = None


def train(config, run) -> None:
    source = Path(run.data_path(config.workdir)).resolve()
    program = resolve_program(config.argv_head()[0], source)
    if program is None:
        raise FileNotFoundError(f"command {config.argv_head()[0]!r}: not found (looked in {source} "
                                "and on PATH) or not executable")
    state = run.load_checkpoint() or {}
    attempt = int(state.get("attempt", 0)) + 1
    root = Path(tempfile.mkdtemp(prefix="hpsweep-cell-"))
    try:
        _run_program(config, run, source, program, state, attempt, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_program(config, run, source: Path, program: str, state: dict, attempt: int, root: Path) -> None:
    work, ckpt_path, metrics_path = root / "work", root / "checkpoint", root / "metrics.jsonl"
    work.mkdir()
    mirror(source, work)
    ckpt = CheckpointDir(ckpt_path)
    resumed = "files" in state
    if resumed:
        ckpt.restore(state["files"])
    parser = LineParser(config.metrics, state.get("counts"))
    jsonl = JsonLines(str(metrics_path), int(state.get("json_count", 0)))
    prior_seen = set(state.get("seen", ()))
    env = {**os.environ, "HPSWEEP_CELL_DIR": str(work), "HPSWEEP_CHECKPOINT_DIR": str(ckpt_path),
           "HPSWEEP_METRICS_FILE": str(metrics_path), "HPSWEEP_SEED": str(config.seed),
           "PYTHONUNBUFFERED": "1"}
    env.pop("HPSWEEP_RESUME", None)
    if resumed:
        env["HPSWEEP_RESUME"] = "1"
    args = argv(config, program)
    log_name = "output.log" if attempt == 1 else f"output.attempt-{attempt}.log"
    log_path = root / log_name
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    reporter = _Reporter(run, ckpt, parser, jsonl, attempt)
    proc = start(args, str(work), env, config.grace, str(root))
    try:
        with open(log_path, "wb") as log:
            _pump(proc, log, tail, parser, jsonl, reporter)
        code = proc.wait()
    finally:
        stop_group(proc, config.grace)   # a cancelled cell's program, or what an ended one left
    for step, values in jsonl.read(last=True):
        reporter.report(step, values)
    reporter.save()   # a last state goes out only with a report: pending, as a trainer's would be
    try:
        run.log_artifact(str(log_path))
    except Exception:  # noqa: BLE001 - the output is a convenience; the result stands without it
        pass
    shown = "\n".join(tail)
    if code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        raise CommandFailed(f"command {how}: {' '.join(args)[:300]}", tuple(tail))
    expected = set(declared(config.metrics))
    if not expected and getattr(run, "metric", None):
        expected = {run.metric}   # the default pairs or JSON lines: the sweep's metric
    missing = sorted(expected - parser.seen - jsonl.seen - prior_seen)
    if missing:
        what = ", ".join(missing)
        raise MetricNeverSeen(f"metric {what} never seen in the output of {' '.join(args)[:300]}"
                              + ("" if shown else " (it printed nothing)"), tuple(tail))


def _pump(proc, log, tail, parser: LineParser, jsonl: JsonLines, reporter: _Reporter) -> None:
    """Read the program's output until it closes: each line to the log, the tail and the parser;
    the metrics file between reads. Memory stays flat, whatever the program prints."""
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    rest = b""
    next_poll = time.monotonic() + _POLL_S
    parse, report = parser.parse, reporter.report

    def lines_of(data: bytes) -> None:
        nonlocal rest
        log.write(data)
        parts = (rest + data).split(b"\n")
        rest = parts.pop()
        if len(rest) > 1 << 20:   # a megabyte without a newline: a line of its own
            parts.append(rest)
            rest = b""
        for raw in parts:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            tail.append(line)
            for step, values in parse(line):
                report(step, values)

    def settle() -> None:
        """A checkpoint state was read: first what the program printed before it wrote those
        files (all of it is on the pipe, which holds less than a megabyte), then the state."""
        got = 0
        while got < _DRAIN_BYTES:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            if not data:
                break
            got += len(data)
            lines_of(data)
        for step, values in jsonl.read():
            report(step, values)
        reporter.save()

    try:
        while True:
            if selector.select(timeout=_POLL_S):
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not data:
                    break
                lines_of(data)
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + _POLL_S
                for step, values in jsonl.read():
                    report(step, values)
            if reporter.files is not None:
                settle()
    finally:
        selector.close()
        proc.stdout.close()
    if rest:
        line = rest.decode("utf-8", "replace").rstrip("\r")
        tail.append(line)
        for step, values in parse(line):
            report(step, values)
