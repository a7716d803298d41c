"""One convention for the spread of a single value: the std of n = 1 is undefined, and every
view (the results table, its JSON, the report's HTML and Markdown) shows it as a dash."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

from rich.console import Console

from hpsweep.store.runs import CellRun, SweepRuns
from hpsweep.views.document import Section, Table, render_html, render_markdown
from hpsweep.views.stats import aggregate, mean_std, observations, stat
from hpsweep.views.tables import results_json, results_table


def _runs(values):
    """values: per cell (lr, seed, value or None for a pending cell)."""
    plan, cells = [], {}
    for i, (lr, seed, v) in enumerate(values):
        plan.append(SimpleNamespace(id=f"c{i}", params={"lr": lr}, seed=seed))
        if v is not None:
            cells[f"c{i}"] = CellRun(f"c{i}", f"r{i}", "done", "FINISHED", seed, {"lr": lr}, {},
                                     {"loss": v}, {}, 0, 0)
    return observations(plan, SweepRuns("s", None, "1", "p", cells))


def test_mean_std_matches_the_standard_library():
    vals = [0.3, 1.7, 2.2, 5.0]
    mean, std = mean_std(vals)
    assert mean == statistics.fmean(vals) and math.isclose(std, statistics.stdev(vals))
    assert math.isnan(mean_std([4.0])[1]) and mean_std([4.0])[0] == 4.0
    assert all(math.isnan(x) for x in mean_std([]))


def test_one_seed_has_no_std_anywhere():
    obs = _runs([(0.1, 0, 2.0), (0.1, 1, None), (0.01, 0, 1.0), (0.01, 1, 2.0)])
    groups = aggregate(obs, "loss", "min")
    (best_cfg, best), (one_cfg, one) = groups
    assert best_cfg == {"lr": 0.01} and best.n == 2 and best.std == statistics.stdev([1.0, 2.0])
    assert one_cfg == {"lr": 0.1} and (one.n, one.N, one.missing) == (1, 2, 1)
    assert math.isnan(one.std) and one.std_text() == "—"
    assert one.fmt() == "2 ± — (n=1/2)"
    js = results_json(groups)
    assert js[1]["std"] is None and js[1]["mean"] == 2.0 and js[1]["seeds"] == [0]
    console = Console(width=200, record=True)
    console.print(results_table(groups, "loss", "min", "t"))
    row = [line for line in console.export_text().splitlines() if "0.1 " in line or "│ 0.1" in line]
    assert row and "—" in row[0] and "± 0" not in console.export_text()
    section = Section("s", tables=[Table(["lr", "loss"], [[0.1, stat([o for o in obs if o.params["lr"] == 0.1], "loss")]])])
    assert 'data-std="nan"' in render_html("t", [section]) and "2 ± —" in render_html("t", [section])
    assert "2 ± — (n=1/2)" in render_markdown("t", [section], [])


def test_no_finished_seed_has_no_mean():
    obs = _runs([(0.1, 0, None), (0.1, 1, None)])
    [(cfg, s)] = aggregate(obs, "loss", "min")
    assert s.n == 0 and s.mean_text() == "—" and results_json([(cfg, s)])[0]["mean"] is None
