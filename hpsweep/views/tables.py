"""Tables a person reads in a terminal: results over seeds (``hpsweep results``, and after
``hpsweep run``) and the completeness matrix (``hpsweep status``). The numbers come from
:mod:`hpsweep.views.stats`; an undefined one (no finished cell, the std of one value) is a dash."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from hpsweep.fmt import fmt_value
from hpsweep.views.stats import Completeness, Stat

__all__ = ["results_table", "results_json", "status_table", "with_leases"]

_MARK = {"done": ("●", "green"), "running": ("◐", "yellow"), "failed": ("✗", "red"),
         "interrupted": ("○", "cyan"), "pending": ("·", "dim"), "stale": ("◌", "magenta")}

def results_json(groups: list[tuple[dict, Stat]]) -> list[dict[str, Any]]:
    """The groups of :func:`hpsweep.views.stats.aggregate`, JSON-able (undefined numbers as null)."""
    return [{"params": params, **s.as_dict()} for params, s in groups]

def results_table(groups: list[tuple[dict, Stat]], metric: str, mode: str, title: str,
                  limit: int = 0) -> Table:
    """The groups of :func:`hpsweep.views.stats.aggregate` (best first): mean, std, n, missing."""
    names = list(dict.fromkeys(k for params, _ in groups for k in params))
    table = Table(title=title, caption=f"{metric}: final value, mean ± std over seeds "
                                       f"({'lower' if mode == 'min' else 'higher'} is better)")
    table.add_column("#", justify="right")
    for name in names:
        table.add_column(name)
    for col in ("mean", "± std", "n", "missing"):
        table.add_column(col, justify="right")
    shown = groups[:limit] if limit else groups
    for i, (params, s) in enumerate(shown, 1):
        style = "bold green" if i == 1 and s.n else ""
        table.add_row(str(i), *(fmt_value(params.get(n)) for n in names),
                      Text(s.mean_text(), style=style), s.std_text(), str(s.n),
                      Text(str(s.missing), style="red" if s.missing else "dim"))
    if limit and len(groups) > limit:
        table.add_row("…", *([""] * len(names)), f"{len(groups) - limit} more", "", "", "")
    return table

def with_leases(matrix: Completeness, held: dict[str, str]) -> Completeness:
    """``matrix`` seen through the cells' leases (cell id -> its holder, for the live ones).

    A cell that a live lease holds is running, even where MLflow has no run yet or a failed
    one. A cell RUNNING in MLflow that no live lease holds is *stale*: every trial holds its
    cell's lease for as long as it runs and renews it, so its driver was killed (the next
    ``hpsweep run`` resumes it)."""
    import dataclasses

    def mark(c):
        if c.cell_id in held and c.state != "done":
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
        table.add_row(*(fmt_value(params.get(n)) for n in names), *marks)
    if limit and len(matrix.rows) > limit:
        table.add_row(f"… {len(matrix.rows) - limit} more rows",
                      *([""] * (len(names) + len(matrix.seeds) - 1)))
    return table
