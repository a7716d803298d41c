"""Tables a person reads in a terminal: results over seeds (``hpsweep results``, and after
``hpsweep run``) and the completeness matrix (``hpsweep status``). The numbers come from
:mod:`hpsweep.views.stats`; an undefined one (no finished cell, the std of one value) is a dash."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from rich.table import Table
from rich.text import Text

from hpsweep.fmt import fmt_param, fmt_value
from hpsweep.views.stats import Completeness, Stat

__all__ = ["results_table", "results_json", "status_table", "with_leases", "rows_table", "rows_csv", "rows_markdown",
           "emit_rows"]

_MARK = {"done": ("●", "green"), "stopped": ("◑", "cyan"), "running": ("◐", "yellow"), "failed": ("✗", "red"),
         "interrupted": ("○", "cyan"), "pending": ("·", "dim"), "stale": ("◌", "magenta")}

def results_json(groups: list[tuple[dict, Stat]]) -> list[dict[str, Any]]:
    """The groups of :func:`hpsweep.views.stats.aggregate`, JSON-able (undefined numbers as null)."""
    return [{"params": params, **s.as_dict()} for params, s in groups]

def results_table(groups: list[tuple[dict, Stat]], metric: str, mode: str, title: str,
                  limit: int = 0, pooled: list[str] | None = None) -> Table:
    """The groups of :func:`hpsweep.views.stats.aggregate` (best first): mean, std, n, missing,
    and the step the values come from. ``pooled``: the swept parameters each group also
    averages over (``--group-by``), named in the caption."""
    names = list(dict.fromkeys(k for params, _ in groups for k in params))
    over = "seeds" + (f" and {', '.join(pooled)}" if pooled else "")
    stopped = sum(s.stopped for _, s in groups)
    table = Table(title=title, caption=f"{metric}: final value, mean ± std over {over} "
                                       f"({'lower' if mode == 'min' else 'higher'} is better)"
                  + ("; step: the step the values come from" if any(s.step_text() for _, s in groups) else "")
                  + (f"; {stopped} values from cells the scheduler stopped early (*)" if stopped else ""))
    table.add_column("#", justify="right")
    for name in names:
        table.add_column(name)
    for col in ("mean", "± std", "n", "missing", "step"):
        table.add_column(col, justify="right")
    shown = groups[:limit] if limit else groups
    for i, (params, s) in enumerate(shown, 1):
        style = "bold green" if i == 1 and s.n else ""
        table.add_row(str(i), *(fmt_param(params.get(n)) for n in names),
                      Text(s.mean_text(), style=style), s.std_text(), str(s.n),
                      Text(str(s.missing), style="red" if s.missing else "dim"),
                      s.step_text() + (" *" if s.stopped else ""))
    if limit and len(groups) > limit:
        table.add_row("…", *([""] * len(names)), f"{len(groups) - limit} more", "", "", "", "")
    return table


def rows_table(rows: list[dict[str, Any]], title: str, limit: int = 0) -> Table:
    """Rows (dicts with the same keys) as a terminal table, numbers as :func:`fmt_value` writes them."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    table = Table(title=title)
    for name in names:
        table.add_column(name, justify="right" if any(isinstance(r.get(name), (int, float)) for r in rows) else "left")
    for r in rows[:limit] if limit else rows:
        table.add_row(*(fmt_value(r.get(n)) for n in names))
    if limit and len(rows) > limit:
        table.add_row(f"… {len(rows) - limit} more", *([""] * (len(names) - 1)))
    return table


def _full(v: Any) -> str:
    """A value in full, for files: floats as Python's shortest exact repr, None as empty."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return repr(v) if isinstance(v, float) else str(v)


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV with a header (every key of any row); values in full."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names)
    for r in rows:
        writer.writerow([_full(r.get(n)) for n in names])
    return out.getvalue()


def rows_markdown(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table; values in full."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(_full(r.get(n)).replace("|", "\\|") for n in names) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def with_leases(matrix: Completeness, held: dict[str, str]) -> Completeness:
    """``matrix`` seen through the cells' leases (cell id -> its holder, for the live ones).

    A cell that a live lease holds is running, even where MLflow has no run yet or a failed
    one. A cell RUNNING in MLflow that no live lease holds is *stale*: every trial holds its
    cell's lease for as long as it runs and renews it, so its driver was killed (the next
    ``hpsweep run`` resumes it)."""
    import dataclasses

    def mark(c):
        if c.cell_id in held and c.state not in ("done", "stopped"):
            return dataclasses.replace(c, state="running")
        if c.state == "running":
            return dataclasses.replace(c, state="stale")
        return c

    rows = [(params, {seed: mark(c) for seed, c in by_seed.items()}) for params, by_seed in matrix.rows]
    return dataclasses.replace(matrix, cells=[mark(c) for c in matrix.cells], rows=rows)


def status_table(matrix: Completeness, title: str, limit: int = 0) -> Table:
    """Rows are configurations, columns are seeds; each cell is done / running / failed /
    interrupted (resumable) / pending, or stale."""
    names = list(dict.fromkeys(k for params, _ in matrix.rows for k in params))
    table = Table(title=title, caption="● done  ◐ running  ✗ failed  ○ interrupted  · pending"
                  + ("  ◑ stopped early by the scheduler" if matrix.counts.get("stopped") else "")
                  + ("  ◌ stale" if matrix.counts.get("stale") else ""))
    for name in names:
        table.add_column(name)
    for seed in matrix.seeds:
        table.add_column(f"seed {seed}", justify="center")
    rows = matrix.rows[:limit] if limit else matrix.rows
    for params, by_seed in rows:
        marks = []
        for seed in matrix.seeds:
            state = by_seed[seed].state if seed in by_seed else "pending"
            mark, style = _MARK.get(state, ("?", ""))
            marks.append(Text(mark, style=style))
        table.add_row(*(fmt_param(params.get(n)) for n in names), *marks)
    if limit and len(matrix.rows) > limit:
        table.add_row(f"… {len(matrix.rows) - limit} more rows",
                      *([""] * (len(names) + len(matrix.seeds) - 1)))
    return table


def emit_rows(rows: list[dict[str, Any]], fmt: str, title: str, console, limit: int = 0) -> None:
    """Rows on stdout as CSV, JSON or Markdown (numbers in full), or on ``console`` as a table."""
    import sys

    if fmt == "json":
        sys.stdout.write(json.dumps(rows, default=str, indent=1) + "\n")
    elif fmt == "csv":
        sys.stdout.write(rows_csv(rows))
    elif fmt == "markdown":
        sys.stdout.write(rows_markdown(rows))
    else:
        console.print(rows_table(rows, title, limit=limit))
