"""The report renders from constructed runs (no MLflow): missing cells stay visible, every
statistic cell carries the numbers it shows, the paper-specific figures appear when their
metrics do, and load_sweep reads back what a local SQLite store holds."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/report_support.py
from report_support import ReportPage  # noqa: E402

from hpsweep.spec.protocol import Claim, Selection
from hpsweep.store.mlflow import run_url
from hpsweep.store.runs import CellRun, SweepRuns, load_sweep
from hpsweep.views.report import render_report


def _spec(**kw):
    base = dict(name="t", trainer="snap", description="", selection=None, claims=[],
                metric=SimpleNamespace(name="valid/bpc", mode="min"))
    base.update(kw)
    return SimpleNamespace(**base)


def _snap_sweep(drop=(), failed=()):
    """method x lr x 3 seeds with curves for bpc and copy length; ``drop``: cells never run."""
    plan, cells = [], {}
    i = 0
    for method, base in (("bptt", 1.6), ("snap1", 1.5), ("rtrl", 1.45)):
        for lr in (1e-3, 1e-4):
            for seed in range(3):
                cid = f"{method}-{lr}-{seed}"
                params = {"method": method, "lr": lr}
                plan.append(SimpleNamespace(id=cid, params=params, seed=seed))
                i += 1
                if cid in drop:
                    continue
                v = base + (0.1 if lr == 1e-4 else 0.0) + 0.01 * seed
                hist = {"valid/bpc": [(s, v + 1.0 / s) for s in range(1, 11)],
                        "copy/length": [(s, float(s) * (2 if method != "bptt" else 1)) for s in range(1, 11)]}
                metrics = {k: h[-1][1] for k, h in hist.items()}
                metrics["test/bpc"] = metrics["valid/bpc"] + 0.02
                st = "FAILED" if cid in failed else "FINISHED"
                cells[cid] = CellRun(cid, f"run{i}", "failed" if cid in failed else "done", st,
                                     seed, params, {}, metrics, hist, 0, 0)
    return plan, SweepRuns("t", "http://mlflow.example", "7", "parent", cells)


def test_partial_sweep_report_shows_missing_cells_and_consistent_numbers(tmp_path):
    drop = {"snap1-0.001-2"}
    plan, runs = _snap_sweep(drop=drop, failed={"bptt-0.001-0"})
    sel = Selection(group_by=["method"], select_by="valid/bpc", over=["lr"], report=["test/bpc"])
    claims = [Claim(id="c", text="snap1 within 0.2 of rtrl", kind="within", margin=0.2,
                    metric="test/bpc", left={"method": "snap1"}, right={"method": "rtrl"})]
    html_path, md_path, figs = render_report(_spec(selection=sel, claims=claims), runs, plan,
                                             tmp_path, "http://ui")
    md = md_path.read_text()
    assert "Cells: 18 planned: 16 done, 0 running, 1 failed, 0 interrupted, 1 pending." in md
    assert md.count("| missing |") == 1 and "FAILED" in md
    # the chosen snap1 configuration has 2 of its 3 seeds: the table says so
    assert re.search(r"\| snap1 \| 0\.001 \| [^|]+\(n=2/3\)", md)
    p = ReportPage()
    p.feed(html_path.read_text())
    assert p.stats, "no statistic cells"
    by_run = {c.run_id: c for c in runs.cells.values()}
    for s in p.stats:
        ids = [r for r in s["data-runs"].split(",") if r]
        vals = [by_run[r].metrics[s["data-metric"]] for r in ids]
        assert int(s["data-n"]) == len(vals)
        assert float(s["data-mean"]) == pytest.approx(sum(vals) / len(vals), rel=1e-12)
        if len(vals) > 1:
            m = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
            assert float(s["data-std"]) == pytest.approx(sd, rel=1e-9)
        assert s["text"].startswith(f"{float(s['data-mean']):.4g}")
    # every run row links to its MLflow run
    assert run_url("http://ui", "7", "run1") in p.links
    assert all(l.startswith("http://ui/#/experiments/7/runs/") for l in p.links)
    # learning curves, sensitivity, bpc per method, Copy length per method
    names = [f.name for f in figs]
    assert any("copy-curriculum-length" in n for n in names), names
    assert any("bits-per-character" in n for n in names), names
    assert len(p.imgs) == len(figs) and all(i.startswith("data:image/png;base64,") for i in p.imgs)
    assert "| c | snap1 within 0.2 of rtrl | **" in md


def test_report_without_selection_ranks_configurations_and_mbpa_figures(tmp_path):
    plan, cells = [], {}
    i = 0
    for lc in (0.0, 0.1):
        for lm in (0.0, 0.1):
            for method in ("mbpa", "ewc", "sgd"):
                for seed in range(2):
                    i += 1
                    cid = f"c{i}"
                    params = {"lambda_cache": lc, "lambda_mbpa": lm, "method": method}
                    plan.append(SimpleNamespace(id=cid, params=params, seed=seed))
                    ppl = 100 - 100 * lc - 50 * lm + seed
                    metrics = {"valid/ppl": ppl, **{f"acc/task_{t}": 0.9 - 0.01 * t for t in range(4)}}
                    cells[cid] = CellRun(cid, f"r{i}", "done", "FINISHED", seed, params, {},
                                         metrics, {"valid/ppl": [(1, ppl + 5), (2, ppl)]}, 0, 0)
    runs = SweepRuns("m", "sqlite:///x", "3", None, cells)
    spec = _spec(trainer="mbpa", metric=SimpleNamespace(name="valid/ppl", mode="min"))
    html_path, md_path, figs = render_report(spec, runs, plan, tmp_path, "http://ui")
    md = md_path.read_text()
    assert "## Best configurations by valid/ppl" in md
    first = [l for l in md.splitlines() if l.startswith("| 1 |")][0]
    assert "| 0.1 | 0.1 |" in first and "(n=2/2)" in first
    names = [f.name for f in figs]
    assert any("parallel" in n for n in names)
    assert any("accuracy-on-each-task" in n for n in names)
    assert any("lambda-cache" in n for n in names)


@pytest.mark.slow  # creating an MLflow SQLite schema takes seconds on a loaded machine
def test_load_sweep_reads_a_local_store(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = MlflowClient(uri)
    eid = c.create_experiment("sw")
    parent = c.create_run(eid, tags={"hpsweep.role": "sweep", "hpsweep.sweep": "sw"}).info.run_id
    ids = {}
    for cell, status in (("a", "FAILED"), ("a", "FINISHED"), ("b", "RUNNING")):
        r = c.create_run(eid, tags={"mlflow.parentRunId": parent, "hpsweep.role": "cell",
                                    "hpsweep.sweep": "sw", "hpsweep.cell_id": cell,
                                    "hpsweep.seed": "1", "hpsweep.params": json.dumps({"lr": 0.1})})
        c.log_batch(r.info.run_id, metrics=[Metric("loss", 10.0 - s, 1000 + s, s) for s in range(5)])
        if status != "RUNNING":
            c.set_terminated(r.info.run_id, status)
        ids[(cell, status)] = r.info.run_id
    got = load_sweep(uri, "sw", histories=["lo*"])
    assert got.parent_run_id == parent
    assert got.cells["a"].run_id == ids[("a", "FINISHED")] and got.cells["a"].duplicates == 1
    assert got.cells["b"].status == "running" and got.cells["b"].seed == 1
    assert got.cells["a"].histories["loss"] == [(s, 10.0 - s) for s in range(5)]
    assert got.cells["a"].metrics == {"loss": 6.0} and got.cells["a"].params == {"lr": 0.1}
    assert load_sweep(uri, "nothing-here").cells == {}


SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"


@pytest.mark.parametrize("name", ["snap.charlm.yaml", "snap.copy.yaml",
                                  "mbpa.permuted-mnist.yaml", "mbpa.lm-cpu.yaml"])
def test_shipped_paper_sweeps_render(name, tmp_path):
    """Each paper sweep's selection protocol and claims run on synthetic results for every
    metric its trainer declares; one configuration is left unfinished to stay visible."""
    import hashlib

    from hpsweep.spec.model import load_spec
    from hpsweep.spec.plan import plan
    from hpsweep.trainer.registry import load_trainer

    spec = load_spec(SWEEPS / name)
    cells = plan(spec)
    declared = [m.replace("*", str(i)) for m in load_trainer(spec.trainer).metrics
                for i in (range(5) if "*" in m else [0])]
    runs = {}
    for k, cell in enumerate(cells):
        if k == 0:
            continue                                   # pending
        u = int(hashlib.sha256(cell.id.encode()).hexdigest()[:8], 16) / 2 ** 32
        hist = {m: [(s, 1.0 + u + j / 10 + 1 / s) for s in range(1, 6)]
                for j, m in enumerate(declared)}
        runs[cell.id] = CellRun(cell.id, f"r{k}", "done", "FINISHED", cell.seed, cell.params, {},
                                {m: h[-1][1] for m, h in hist.items()}, hist, 0, 0)
    sweep_runs = SweepRuns(spec.name, "http://x", "1", "p", runs)
    html_path, md_path, figs = render_report(spec, sweep_runs, cells, tmp_path, "http://ui")
    md = md_path.read_text()
    assert f"Cells: {len(cells)} planned: {len(cells) - 1} done, 0 running, 0 failed, 0 interrupted, 1 pending." in md
    assert "| missing |" in md
    for claim in spec.claims:
        assert f"| {claim.id} |" in md
    assert len(figs) >= 2
    if spec.selection is not None:   # every group reports its chosen configuration's cells
        sel = md.split("## Selection protocol")[1].split("##")[0]
        assert "(0/0)" not in sel


def test_several_sweeps_share_one_page_with_one_claims_table(tmp_path):
    """``hpsweep report A.yaml B.yaml``: every sweep's claims in one table (with the sweep
    named), then each sweep's own sections under its name; figures numbered across both."""
    from hpsweep.views.report import render_reports

    plan_a, runs_a = _snap_sweep()
    plan_b, runs_b = _snap_sweep(drop={"rtrl-0.001-0"})
    runs_b = SweepRuns("u", runs_b.tracking_uri, "8", "parent-b", runs_b.cells)
    ahead = Claim(id="snap1-ahead", text="snap1 below bptt", kind="less", metric="valid/bpc",
                  left={"method": "snap1"}, right={"method": "bptt"}, source="Fig. 2")
    behind = Claim(id="rtrl-behind", text="rtrl above bptt", kind="greater", metric="valid/bpc",
                   left={"method": "rtrl"}, right={"method": "bptt"}, source="Table 1")
    html_path, md_path, fig_paths = render_reports(
        [(_spec(name="a", claims=[ahead]), runs_a, plan_a),
         (_spec(name="u", claims=[behind]), runs_b, plan_b)], tmp_path, "http://ui")
    md = md_path.read_text()
    assert md.startswith("# hpsweep report: a, u")
    # one claims section, first, naming each claim's sweep; no per-sweep claims sections
    assert md.count("## Claims") == 1 and "## a: Claims" not in md and "## u: Claims" not in md
    assert md.index("## Claims") < md.index("## a: Summary") < md.index("## u: Summary")
    rows = [line for line in md.splitlines() if line.startswith("| snap1-ahead") or line.startswith("| rtrl-behind")]
    assert len(rows) == 2
    assert rows[0].rstrip(" |").endswith("a") and rows[1].rstrip(" |").endswith("u")
    # snap1 (1.5 + ...) is below bptt (1.6 + ...): reproduced; rtrl (1.45) is not above bptt
    assert "**reproduced**" in rows[0] and "**not reproduced**" in rows[1]
    # u lost one rtrl cell: its own summary says so, a's does not
    assert "Cells: 18 planned: 18 done" in md and "Cells: 18 planned: 17 done" in md
    # every figure of both sweeps is a file, linked once, numbered across the page
    assert len(fig_paths) == len(set(fig_paths)) >= 4
    for p in fig_paths:
        assert p.exists() and md.count(f"figures/{p.name}") == 1


def test_figures_say_which_cells_they_show_and_keep_lines_and_axes_honest(tmp_path, monkeypatch):
    """Captions name the cells each figure draws; a pow10 parameter is on a log axis even
    over one decade; a line identical to another says so and both stay visible; parameter
    values print with the same digits in the CLI's tables and the report."""
    from rich.console import Console

    from hpsweep.spec.domains import Pow10
    from hpsweep.views import figures as figs
    from hpsweep.views.stats import Obs, aggregate
    from hpsweep.views.tables import results_table

    drawn = []
    real_png = figs._png
    monkeypatch.setattr(figs, "_png", lambda fig: drawn.append(fig) or real_png(fig))
    plan, runs = _snap_sweep()
    spec = _spec(parameters={"method": None, "lr": Pow10(pow10=[-3, -4])})
    _html, md, _figs = render_report(spec, runs, plan, tmp_path, "http://mlflow.example")
    titles = [f.axes[0].get_title() or f._suptitle.get_text() for f in drawn]
    assert "each method at its selected lr, chosen on valid/bpc" in md.read_text()  # captioned in the report
    # which cells: every configuration (6 of them), then each method at its selected lr
    assert any(t.startswith("Learning curves of valid/bpc") and "every configuration (6)" in t for t in titles), titles
    assert any("each method at its selected lr, chosen on valid/bpc" in t for t in titles), titles
    # no figure drawn twice
    assert len(titles) == len(set(titles)), titles
    # the pow10 parameter on a log axis (1e-3 and 1e-4: one decade, linear before)
    sens = next(f for f in drawn if f._suptitle is not None and "Sensitivity" in f._suptitle.get_text())
    panels = {ax.get_xlabel(): ax.get_xscale() for ax in sens.axes if ax.get_xlabel()}
    assert panels["lr"] == "log", panels

    # identical curves: the second says so, and both differ in marker or dash
    drawn.clear()
    same = [[(1, 1.0), (2, 0.5), (3, 0.25)]]
    figs.curves("t", "m", [("a", same), ("b", same), ("c", [[(1, 2.0), (2, 1.0), (3, 0.5)]])])
    lines = drawn[0].axes[0].get_lines()
    labels = [ln.get_label() for ln in lines]
    assert labels[1] == "b (n=1, identical to a)" and "identical" not in labels[0] + labels[2], labels
    assert (lines[0].get_marker(), lines[0].get_linestyle()) != (lines[1].get_marker(), lines[1].get_linestyle())

    # one number format: 10^-2.5 as 0.00316228 in the CLI's results table and in the report
    lr = 10 ** -2.5
    obs = [Obs(f"c{s}", {"lr": lr, "seed": s}, "done", {"loss": 1.0 + s}, f"r{s}") for s in range(2)]
    out = Console(width=200, record=True)
    out.print(results_table(aggregate(obs, "loss", "min"), "loss", "min", "t"))
    assert "0.00316228" in out.export_text()
    from hpsweep.views.report import _label

    assert _label({"lr": lr}) == "lr=0.00316228"
    # ... and in the live lines and failure lines, which label a cell as the plan does
    from hpsweep.spec.plan import Cell
    from hpsweep.views.live import LiveTable

    cell = Cell("c0", 0, 0, {"lr": lr}, {"lr": lr, "seed": 0})
    assert cell.label() == "lr=0.00316228 seed=0"
    spec = SimpleNamespace(name="t", metric=SimpleNamespace(name="loss", mode="min"), scheduler=None)
    live_out = Console(width=200, record=True, force_terminal=False)
    live = LiveTable(spec, [cell], console=live_out, enabled=False, total=1, skipped=0)
    live.started("t1", {"cell": "c0"})
    live.result("t1", {"step": 1, "loss": 0.5})
    live.done("t1", "done")
    assert "lr=0.00316228 seed=0" in live_out.export_text(), live_out.export_text()


def test_live_lines_say_a_cell_was_stopped_early_and_at_which_step():
    from rich.console import Console

    from hpsweep.views.live import LiveTable

    spec = SimpleNamespace(name="t", metric=SimpleNamespace(name="loss", mode="min"),
                           scheduler=SimpleNamespace(type="asha", max_t=8))
    cells = [SimpleNamespace(id=c, label=lambda c=c: f"x={c}") for c in ("a", "b")]
    out = Console(width=200, record=True, force_terminal=False)
    table = LiveTable(spec, cells, console=out, enabled=False, total=2, skipped=0)
    for trial, cell, steps in (("t1", "a", 2), ("t2", "b", 8)):
        table.started(trial, {"cell": cell})
        table.result(trial, {"step": steps, "loss": 1.0 / steps})
    table.done("t1", "stopped")
    table.done("t2", "done")
    text = out.export_text()
    assert "[1/2] stopped at step 2 of 8 x=a" in text and "[2/2] done" in text, text
