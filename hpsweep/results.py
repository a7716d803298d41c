"""Tables a person reads in a terminal: the completeness matrix and results over seeds."""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

from rich.table import Table
from rich.text import Text

from hpsweep.store import Completeness, SweepRuns

__all__ = ["aggregate", "results_table", "status_table", "Aggregate"]

_MARK = {"done": ("●", "green"), "running": ("◐", "yellow"), "failed": ("✗", "red"),
         "pending": ("·", "dim")}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Aggregate(dict):
    """One group's figures: ``params``, ``mean``, ``std``, ``n``, ``values``, ``missing``."""


def aggregate(sweep_runs: SweepRuns, planned: list, metric: str, mode: str,
              group_by: list[str] | None = None) -> list[Aggregate]:
    """The final value of ``metric`` over seeds, per configuration (or per ``group_by``).

    Only finished runs count; the cells of a group that have no finished run (pending,
    running, failed) are counted in ``missing`` and never averaged away silently. Groups come
    best first by mean (``mode``), groups without any value last.
    """
    groups: dict[str, Aggregate] = {}
    for cell in planned:
        params = {k: v for k, v in cell.params.items() if group_by is None or k in group_by}
        key = json.dumps(params, sort_keys=True, default=str)
        group = groups.setdefault(key, Aggregate(params=params, values=[], missing=0, seeds=[]))
        run = sweep_runs.cells.get(cell.id)
        value = run.metrics.get(metric) if run is not None and run.status == "done" else None
        if value is None or (isinstance(value, float) and math.isnan(value)):
            group["missing"] += 1
        else:
            group["values"].append(float(value))
            group["seeds"].append(cell.seed)
    out = []
    for group in groups.values():
        values = group["values"]
        group["n"] = len(values)
        group["mean"] = statistics.fmean(values) if values else None
        group["std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        out.append(group)
    sign = 1 if mode == "min" else -1
    out.sort(key=lambda g: (g["mean"] is None, sign * g["mean"] if g["mean"] is not None else 0))
    return out


def results_table(groups: list[Aggregate], metric: str, mode: str, title: str, limit: int = 0) -> Table:
    names = list(groups[0]["params"]) if groups else []
    table = Table(title=title, caption=f"{metric}: final value, mean ± std over seeds "
                                       f"({'lower' if mode == 'min' else 'higher'} is better)")
    table.add_column("#", justify="right")
    for name in names:
        table.add_column(name)
    for col in ("mean", "± std", "n", "missing"):
        table.add_column(col, justify="right")
    shown = groups[:limit] if limit else groups
    for i, g in enumerate(shown, 1):
        style = "bold green" if i == 1 and g["mean"] is not None else ""
        table.add_row(str(i), *(_fmt(g["params"][n]) for n in names),
                      Text(_fmt(g["mean"]) if g["mean"] is not None else "—", style=style),
                      _fmt(g["std"]) if g["std"] is not None else "—", str(g["n"]),
                      Text(str(g["missing"]), style="red" if g["missing"] else "dim"))
    if limit and len(groups) > limit:
        table.add_row("…", *([""] * len(names)), f"{len(groups) - limit} more", "", "", "")
    return table


def status_table(matrix: Completeness, title: str, limit: int = 0) -> Table:
    """Rows are configurations, columns are seeds; each cell is done / running / failed / pending."""
    names = list(matrix.rows[0][0]) if matrix.rows else []
    table = Table(title=title, caption="● done  ◐ running  ✗ failed  · pending")
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
        table.add_row(*(_fmt(params[n]) for n in names), *marks)
    if limit and len(matrix.rows) > limit:
        table.add_row(f"… {len(matrix.rows) - limit} more rows", *([""] * (len(names) + len(matrix.seeds) - 1)))
    return table
