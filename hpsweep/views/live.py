"""The live view of a running sweep: a table of trials that redraws in place on a terminal,
and one line per finished trial elsewhere (CI logs, pipes).

Events (a trial started, a result, a trial done: 64 a second at 64 trials) only update the
table's state, which is kept as it is drawn (the running rows, the last finished ones, the
counts); Rich's refresh thread draws it once a second. Measured as ``bench/slots.py`` does, at
64 running rows and 64 results a second on a loaded 2-core machine: 2.4 % of a core, against
5.0 % when each event rebuilt the table (at most four times a second) and Rich redrew it twice
a second besides.
"""

from __future__ import annotations

import collections
import threading
import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hpsweep.fmt import fmt_params, fmt_value

__all__ = ["LiveTable"]

_SHOWN_RECENT = 8


class LiveTable:
    """Fed by the engine's Tune callback: ``started``, ``result``, ``done``."""

    def __init__(self, spec, pending: list, console: Console | None = None, enabled: bool | None = None,
                 total: int = 0, skipped: int = 0) -> None:
        self.spec = spec
        self.console = console or Console(stderr=False)
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self.labels = {c.id: c.label() for c in pending}
        self.total, self.skipped = total, skipped
        self.rows: dict[str, dict] = {}           # trial id -> row
        self.counts = {"done": 0, "failed": 0}
        self.started_at = time.time()
        self._live: Live | None = None
        self.wait: tuple[str, float] | None = None   # what the sweep waits for, since when
        self._wait_said = 0.0
        self._running: dict[str, dict] = {}       # the rows drawn as running, in start order
        self._recent: collections.deque = collections.deque(maxlen=_SHOWN_RECENT)   # the last ended
        self._lock = threading.Lock()             # events come from Tune, draws from Rich's thread

    # -- context: the Live display only while Tune runs
    def __enter__(self) -> LiveTable:
        self.note(f"sweep {self.spec.name!r}: {self.total} cells, {self.skipped} already finished, "
                  f"{self.total - self.skipped} to run")
        if self.enabled:
            self._live = Live(_View(self), console=self.console, refresh_per_second=1, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(*exc)
            self._live = None

    def note(self, message: str) -> None:
        self.console.print(message)

    # -- events
    def started(self, trial_id: str, config: dict) -> None:
        cell = config.get("cell")
        label = self.labels.get(cell) or fmt_params(config)
        row = {"label": label, "status": "running", "step": None, "metric": None,
               "start": time.time(), "end": None}
        with self._lock:
            self.rows[trial_id] = self._running[trial_id] = row

    def result(self, trial_id: str, result: dict, run_age: float | None = None) -> None:
        """A trainer's report; ``run_age``: seconds since its cell's run started (the row is
        timed from the run's start, as MLflow times it)."""
        row = self.rows.get(trial_id)
        if row is None:
            return
        row["step"] = result.get("step")
        if run_age is not None:
            row["start"] = time.time() - run_age
        value = result.get(self.spec.metric.name)
        if value is not None:
            row["metric"] = value

    def done(self, trial_id: str, status: str, error: str = "", took: float | None = None) -> None:
        """The row's cell ended; ``took``: its run's duration as MLflow has it, when known."""
        with self._lock:
            row = self.rows.setdefault(trial_id, {"label": trial_id, "step": None, "metric": None,
                                                  "start": time.time()})
            row["status"], row["end"] = status, time.time()
            if took is not None:
                row["end"] = row["start"] + took
            self.counts[status] = self.counts.get(status, 0) + 1
            self._running.pop(trial_id, None)
            self._recent.append(row)
        if status == "stopped":  # by the scheduler: its values are from this step, not the last
            sched = self.spec.scheduler
            of = f" of {sched.max_t}" if getattr(sched, "max_t", None) else ""
            row["status"] = status = f"stopped at step {row['step'] if row['step'] is not None else '?'}{of}"
        if not self.enabled:
            finished = self.skipped + self.counts["done"] + self.counts.get("stopped", 0) + self.counts["failed"]
            metric = f"{self.spec.metric.name}={fmt_value(row['metric'])}" if row["metric"] is not None else ""
            why = f"  ({error.strip().splitlines()[-1][:120]})" if error.strip() else ""
            self.console.print(f"[{finished}/{self.total}] {status:<6} {row['label']}  {metric}"
                               f"  {row['end'] - row['start']:.1f}s{why}", highlight=False, markup=False)

    # -- cells run by other drivers (their leases held): shown as running there
    def elsewhere(self, trial_id: str | None, cell_id: str, owner: str) -> None:
        """The cell's lease is held by ``owner`` (found by a trial, or before one was made):
        the row is the cell's, not the trial's, and stays running until :meth:`settled` says
        how the cell ended."""
        label = f"{self.labels.get(cell_id, cell_id)}  [by {owner}]"
        with self._lock:
            if trial_id is not None:
                self.rows.pop(trial_id, None)
                self._running.pop(trial_id, None)
            self.rows[f"held:{cell_id}"] = self._running[f"held:{cell_id}"] = {
                "label": label, "status": "running", "step": None, "metric": None,
                "start": time.time(), "end": None}
        if not self.enabled:
            self.console.print(f"[running elsewhere] {label}", highlight=False, markup=False)

    def copied(self, cell_id: str, sweep: str) -> None:
        """A cell another sweep finished, copied into this one (not run again)."""
        self.counts["copied"] = self.counts.get("copied", 0) + 1
        if not self.enabled:
            self.console.print(f"[copied] {self.labels.get(cell_id, cell_id)}  (finished in sweep {sweep})",
                               highlight=False, markup=False)

    def settled(self, cell_id: str, status: str) -> None:
        """How a cell run elsewhere ended: done, failed, or released (it runs here next)."""
        if status == "released":
            with self._lock:
                self.rows.pop(f"held:{cell_id}", None)
                self._running.pop(f"held:{cell_id}", None)
        elif f"held:{cell_id}" in self.rows:
            self.done(f"held:{cell_id}", status)

    # -- a sweep on a cluster waiting for a node that can hold its trials
    def waiting(self, message: str | None, since: float) -> None:
        """Show what the sweep waits for and since when (None: no longer waiting). Without the
        live display (a job's log, a pipe): a line when it begins, then one every 30 s."""
        before = self.wait
        self.wait = (message, since) if message else None
        if not self.enabled:
            now = time.time()
            if message and (before is None or before[0] != message or now - self._wait_said >= 30):
                self._wait_said = now
                self.console.print(f"{message} (waiting {now - since:.0f}s)", highlight=False, markup=False)
            elif message is None and before is not None:
                self.console.print(f"a node can hold the trials now (waited {now - before[1]:.0f}s)",
                                   highlight=False, markup=False)

    # -- drawing (by Rich's refresh thread, once a second: see the module docstring)
    def _render(self):
        with self._lock:
            recent, running = list(self._recent), list(self._running.values())
        table = Table(title=f"{self.spec.name}: {self.spec.metric.name} ({self.spec.metric.mode})",
                      expand=False)
        for col in ("cell", "status", "step", self.spec.metric.name, "time"):
            table.add_column(col, justify="right" if col in ("step", "time") else "left")
        now = time.time()
        for row in recent + running:
            style = {"done": "green", "failed": "red", "running": "yellow"}.get(row["status"], "cyan")
            elapsed = (row["end"] or now) - row["start"]
            table.add_row(row["label"], Text(row["status"], style=style), fmt_value(row["step"] or ""),
                          fmt_value(row["metric"]) if row["metric"] is not None else "", f"{elapsed:.1f}s")
        stopped = self.counts.get("stopped", 0)
        done = self.skipped + self.counts["done"] + stopped
        summary = Text(f"done {done}/{self.total}" + (f" ({stopped} stopped early)" if stopped else "")
                       + f"  running {len(running)}  failed {self.counts['failed']}"
                       f"  pending {self.total - done - len(running) - self.counts['failed']}"
                       f"  elapsed {now - self.started_at:.0f}s")
        if self.wait is None:
            return Group(table, summary)
        return Group(table, summary, Text(f"{self.wait[0]} (waiting {now - self.wait[1]:.0f}s)", style="magenta"))


class _View:
    """What the Live display draws: the table as it is when Rich's refresh thread draws it."""

    def __init__(self, table: LiveTable) -> None:
        self.table = table

    def __rich__(self):
        return self.table._render()
