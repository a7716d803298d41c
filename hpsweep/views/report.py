"""``hpsweep report``: a sweep's runs in MLflow become the paper's tables, figures and claims.

:func:`build_report` reads the sweep back from MLflow (:func:`hpsweep.store.runs.load_sweep`, in
bulk), lines it up against the plan (missing cells stay visible as missing: every statistic
says ``n=finished/planned``), applies the sweep's selection protocol (or ranks configurations
by the sweep metric when there is none), judges the claims (:mod:`hpsweep.views.stats`), draws
the figures (:mod:`hpsweep.views.figures`) and writes a self-contained HTML page (figures embedded
as base64 PNG) and a Markdown twin, then logs both as artifacts of the sweep's parent run.

Every statistic cell in the HTML carries ``data-metric``, ``data-mean``, ``data-std``,
``data-n`` and ``data-runs`` attributes, so a test (or a script) can check each number
against MLflow.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hpsweep.fmt import fmt_param, fmt_params
from hpsweep.store.mlflow import log_report, resolve_tracking_uri, run_url
from hpsweep.store.runs import ENDED, SweepRuns, fetch_histories, load_sweep
from hpsweep.views import figures as figs
from hpsweep.views.document import (
    Links,
    Section,
    Table,
    render_html,
    render_markdown,
)
from hpsweep.views.stats import (
    GroupChoice,
    Obs,
    Verdict,
    apply_selection,
    completeness,
    judge_claims,
    observations,
    pick_configuration,
    rank_configs,
)

__all__ = ["build_report", "build_reports", "render_report", "render_reports"]

_TOP = 20                 # configurations listed when the sweep declares no selection protocol
_MATRIX_ROWS = 300        # beyond this, the completeness matrix lists only incomplete rows


def _plan_cells(spec) -> list | None:
    try:
        from hpsweep.spec.plan import plan
    except ImportError:
        return None
    return plan(spec)


def build_report(tracking_uri: str | None, spec, out_dir: str | Path, *, cells=None,
                 tracking_ui: str | None = None, log_artifacts: bool = True,
                 timings: dict | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (and ``figures/*.png``) into ``out_dir`` for
    the sweep ``spec``, from the runs at ``tracking_uri``; log them to the parent run.

    ``cells``: the plan (default: ``hpsweep.spec.plan.plan(spec)``). ``tracking_ui``: the MLflow UI
    base for run links (default: the tracking URI when it is http(s), else
    ``http://127.0.0.1:5000``, where ``mlflow ui`` serves a local store). ``timings``, when
    given, receives ``fetch_s``, ``render_s`` and ``log_s``. Returns (html path, md path).
    """
    return build_reports(tracking_uri, [spec], out_dir, cells=None if cells is None else [cells],
                         tracking_ui=tracking_ui, log_artifacts=log_artifacts, timings=timings)


def build_reports(tracking_uri: str | None, specs: Sequence[Any], out_dir: str | Path, *,
                  cells: Sequence[list | None] | None = None, tracking_ui: str | None = None,
                  log_artifacts: bool = True, timings: dict | None = None) -> tuple[Path, Path]:
    """One report page for one sweep or several (a family of reproductions): with several, the
    claims of every sweep come first in one table, then each sweep's own sections under its
    name. The page is logged to every sweep's parent run. See :func:`build_report`."""
    uri = resolve_tracking_uri(tracking_uri)
    t0 = time.perf_counter()
    plans = list(cells) if cells is not None else [_plan_cells(spec) for spec in specs]
    all_runs = [load_sweep(uri, spec.name) for spec in specs]
    t1 = time.perf_counter()
    if tracking_ui is None:
        tracking_ui = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    spent = {"histories_s": 0.0}

    def load_histories(r: SweepRuns, wanted: dict) -> SweepRuns:
        t = time.perf_counter()
        r = fetch_histories(r, wanted)
        spent["histories_s"] += time.perf_counter() - t
        return r

    html_path, md_path, fig_paths = render_reports(
        list(zip(specs, all_runs, plans, strict=True)), out_dir, tracking_ui, load_histories)
    t2 = time.perf_counter()
    if log_artifacts:
        for runs in all_runs:
            if runs.parent_run_id:
                log_report(uri, runs.parent_run_id, [html_path, md_path], fig_paths)
    t3 = time.perf_counter()
    if timings is not None:
        h = spent["histories_s"]
        timings.update(fetch_s=t1 - t0 + h, search_s=t1 - t0, histories_s=h,
                       render_s=t2 - t1 - h, log_s=t3 - t2,
                       runs=sum(len(r.cells) for r in all_runs))
    return html_path, md_path


@dataclasses.dataclass
class _Ctx:
    spec: Any
    runs: SweepRuns
    obs: list[Obs]
    url: Callable[[str], str]
    swept: list[str]
    chosen: list[GroupChoice] | None

    def links(self, cells: Sequence[Obs]) -> Links:
        # name each run by its seed, and by whatever else varies among them (data splits)
        varying = sorted({k for o in cells for k in o.params if k != "seed"
                          and len({str(c.params.get(k)) for c in cells}) > 1})

        def label(o: Obs) -> str:
            extra = "".join(f"{k}={fmt_param(o.params.get(k))} " for k in varying)
            state = "" if o.state == "done" else f" ({o.state})"
            return f"{extra}s{o.params.get('seed')}{state}"

        return Links([(label(o), self.url(o.run_id)) for o in cells if o.run_id])

    def pick(self, match: dict) -> tuple[dict | None, list[Obs]]:
        sel = self.spec.selection
        by = sel.select_by if (sel and self.chosen is not None) else self.spec.metric.name
        mode = (sel.mode if sel and sel.mode else None) or self.spec.metric.mode
        return pick_configuration(self.obs, match, self.chosen, by, mode)


def render_report(spec, runs: SweepRuns, planned, out_dir: str | Path, tracking_ui: str,
                  load_histories: Callable[[SweepRuns, dict], SweepRuns] | None = None,
                  ) -> tuple[Path, Path, list[Path]]:
    """Render fetched runs: returns (html, md, figure paths). ``load_histories(runs, {metric:
    run ids})`` fetches the few histories the curve figures draw; without it, the histories
    already in ``runs`` are used."""
    return render_reports([(spec, runs, planned)], out_dir, tracking_ui, load_histories)


def render_reports(sweeps: Sequence[tuple[Any, SweepRuns, list | None]], out_dir: str | Path,
                   tracking_ui: str,
                   load_histories: Callable[[SweepRuns, dict], SweepRuns] | None = None,
                   ) -> tuple[Path, Path, list[Path]]:
    """Render one or several sweeps' fetched runs to one page: (html, md, figure paths)."""
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    several = len(sweeps) > 1
    sections: list[Section] = []
    claim_rows: list[tuple[str, Verdict]] = []
    for spec, runs, planned in sweeps:
        own, verdicts = _sweep_sections(spec, runs, planned, tracking_ui, load_histories)
        claim_rows += [(spec.name, v) for v in verdicts]
        if several:
            own = [dataclasses.replace(sec, title=f"{spec.name}: {sec.title}") for sec in own
                   if sec.title != "Claims"]
        sections += own
    if several and claim_rows:
        sections.insert(0, _claims(claim_rows, with_sweep=True))

    figures = [f for sec in sections for f in sec.figures]
    fig_paths = []
    for i, (title, png) in enumerate(figures):
        p = out / "figures" / f"{i:02d}-{_slug(title)}.png"
        p.write_bytes(png)
        fig_paths.append(p)
    names = ", ".join(spec.name for spec, _, _ in sweeps)
    title = f"hpsweep report: {names}"
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(render_html(title, sections), encoding="utf-8")
    md_path.write_text(render_markdown(title, sections, [f"figures/{p.name}" for p in fig_paths]),
                       encoding="utf-8")
    return html_path, md_path, fig_paths


def _sweep_sections(spec, runs: SweepRuns, planned, tracking_ui: str,
                    load_histories: Callable[[SweepRuns, dict], SweepRuns] | None,
                    ) -> tuple[list[Section], list[Verdict]]:
    """One sweep's sections (summary, completeness, selection or best, claims, figures) and
    its claims' verdicts."""
    obs = observations(planned, runs)
    swept = _swept(spec, obs)
    comp = completeness(planned, runs) if planned is not None else None
    metric, mode = spec.metric.name, spec.metric.mode
    chosen = apply_selection(spec.selection, obs, mode) if spec.selection else None
    verdicts = judge_claims(spec.claims, obs, metric=metric, mode=mode,
                            selection=spec.selection, chosen=chosen)
    ctx = _Ctx(spec, runs, obs, lambda rid: run_url(tracking_ui, runs.experiment_id, rid),
               swept, chosen)

    sections = [_summary(ctx, comp), _completeness(ctx, comp)]
    sections.append(_selection(ctx) if chosen is not None else _best(ctx))
    if spec.claims:
        sections.append(_claims([(spec.name, v) for v in verdicts]))
    specs = _curve_specs(ctx)
    if load_histories is not None:
        ctx.runs = runs = load_histories(runs, _needed_histories(specs))
    sections.append(Section("Figures", figures=_figures(ctx, specs)))
    return sections, verdicts


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-")[:50]


def _swept(spec, obs: Sequence[Obs]) -> list[str]:
    names = list(spec.swept_names()) if hasattr(spec, "swept_names") else []
    for o in obs:
        names += [k for k in o.params if k not in names and k != "seed"]
    return names


# -- sections --------------------------------------------------------------------------------

def _summary(ctx: _Ctx, comp) -> Section:
    spec, runs = ctx.spec, ctx.runs
    lines = [
        f"Sweep `{spec.name}`, trainer `{spec.trainer}`"
        + (f": {spec.description}" if getattr(spec, "description", "") else ""),
        f"Metric: `{spec.metric.name}` ({spec.metric.mode}); swept: "
        + (", ".join(f"`{p}`" for p in ctx.swept) or "nothing") + ".",
        f"Experiment {runs.experiment_id or '(none yet)'}; sweep run "
        + (f"[{runs.parent_run_id}]({ctx.url(runs.parent_run_id)})" if runs.parent_run_id
           else "(none yet)") + ".",
    ]
    if comp is not None:
        c = comp.counts
        lines.append(f"Cells: {comp.total} planned: {c['done']} done, {c['running']} running, "
                     f"{c['failed']} failed, {c['interrupted']} interrupted, {c['pending']} pending"
                     + (f"; {len(comp.orphans)} runs not in the plan (listed apart)"
                        if comp.orphans else "") + ".")
    else:
        lines.append(f"Cells: {len(runs.cells)} runs found (no plan: missing cells unknown).")
    versions = Counter(c.code_version or "unknown" for c in runs.cells.values()
                       if c.status in ENDED)
    if versions:
        lines.append("Code version of the finished runs: " + ", ".join(
            f"`{v}` ({n} run{'s' if n != 1 else ''})" for v, n in versions.most_common()) + ".")
    return Section("Summary", paragraphs=lines)


_SYMBOL = {"done": "done", "stopped": "stopped early", "running": "running", "failed": "FAILED",
           "interrupted": "interrupted", "pending": "missing", "stale": "stale"}


def _completeness(ctx: _Ctx, comp) -> Section:
    if comp is None:
        return Section("Completeness", paragraphs=["No plan for this sweep (sampled search): "
                                                   "only the runs found are shown below."])
    present = {k for p, _ in comp.rows for k in p}
    names = [n for n in ctx.swept if n in present] + sorted(present - set(ctx.swept))
    rows = comp.rows
    note = []
    if len(rows) > _MATRIX_ROWS:
        incomplete = [r for r in rows if any(c.state not in ENDED for c in r[1].values())]
        note.append(f"{len(rows) - len(incomplete)} fully done configurations of {len(rows)} "
                    "are not listed; every configuration with a missing, failed or running "
                    "seed is.")
        rows = incomplete
    table = Table([*names, *(f"seed {s}" for s in comp.seeds)], [], kind="completeness")
    for params, by_seed in rows:
        row: list[Any] = [params.get(n, "") for n in names]
        for s in comp.seeds:
            c = by_seed.get(s)
            if c is None:
                row.append("")
            elif c.run_id:
                row.append(Links([(_SYMBOL[c.state], ctx.url(c.run_id))], state=c.state))
            else:
                row.append(Links([(_SYMBOL[c.state], None)], state=c.state))
        table.rows.append(row)
    tables = [table]
    if comp.orphans:
        orphan = Table(["cell id", "params", "seed", "run"], [], kind="orphans")
        for o in comp.orphans:
            orphan.rows.append([o.cell_id, str(o.params), o.seed,
                                Links([(o.run_id, ctx.url(o.run_id))])])
        note.append("Runs tagged with this sweep whose cell the current YAML does not produce "
                    "(the file changed since): not used anywhere in this report.")
        tables.append(orphan)
    return Section("Completeness", paragraphs=note, tables=tables)


def _selection(ctx: _Ctx) -> Section:
    sel = ctx.spec.selection
    mode = sel.mode or ctx.spec.metric.mode
    head = [*sel.group_by, *(f"chosen {o}" for o in sel.over), f"{sel.select_by} (select)",
            *sel.report, "runs"]
    table = Table(head, [], kind="selection")
    cand = Table([*sel.group_by, *sel.over, f"mean {sel.select_by}", "chosen"], [],
                 kind="candidates")
    for g in ctx.chosen:
        score = next((s for o, s in g.candidates if o == g.chosen), None)
        row: list[Any] = [g.group.get(k) for k in sel.group_by]
        row += [g.chosen.get(o) if g.chosen else "—" for o in sel.over]
        row.append(score if score is not None else "no finished cell")
        row += [g.report.get(m, "—") for m in sel.report]
        row.append(ctx.links(g.cells))
        table.rows.append(row)
        for over, s in g.candidates:
            cand.rows.append([*(g.group.get(k) for k in sel.group_by),
                              *(over.get(o) for o in sel.over), s,
                              "yes" if over == g.chosen else ""])
    p = [f"Within each group of ({', '.join(sel.group_by) or 'the whole sweep'}), the value of "
         f"({', '.join(sel.over)}) with the {'lowest' if mode == 'min' else 'highest'} mean "
         f"`{sel.select_by}` over its finished replicates"
         + (f" among cells matching {sel.select_on}" if sel.select_on else "")
         + "; then the reported metrics of that configuration, mean ± std (n=finished/planned)"
         + (f", over cells matching {sel.report_on}" if sel.report_on else "")
         + (f", excluding {sel.report_exclude}" if sel.report_exclude else "") + "."]
    return Section("Selection protocol", paragraphs=p, tables=[table],
                   details=[("Every candidate", cand)])


def _best(ctx: _Ctx) -> Section:
    m, mode = ctx.spec.metric.name, ctx.spec.metric.mode
    ranked = rank_configs(ctx.obs, m, mode)
    names = [n for n in ctx.swept]
    table = Table(["rank", *names, m, "runs"], [], kind="best")
    for i, (cfg, s) in enumerate(ranked[:_TOP], 1):
        cells = [o for o in ctx.obs if all(o.params.get(k) == v for k, v in cfg.items())]
        table.rows.append([i, *(cfg.get(n, "") for n in names), s, ctx.links(cells)])
    p = [f"No selection protocol declared: the {min(_TOP, len(ranked))} best of {len(ranked)} "
         f"configurations by mean final `{m}` ({mode}) over seeds, n=finished/planned."]
    return Section(f"Best configurations by {m}", paragraphs=p, tables=[table])


def _claims(verdicts: Sequence[tuple[str, Verdict]], with_sweep: bool = False) -> Section:
    head = ["claim", "statement", "verdict", "evidence"] + (["sweep"] if with_sweep else [])
    table = Table(head, [], kind="claims")
    for sweep, v in verdicts:
        src = f" ({v.claim.source})" if v.claim.source else ""
        table.rows.append([v.claim.id, v.claim.text + src, v.verdict, v.reason]
                          + ([sweep] if with_sweep else []))
    p = ["Each side is one configuration (tuned on the selection metric, never on the claim's "
         "metric) and its finished replicates. Rule: the Welch 1−2α confidence interval of the "
         "difference of means (α=0.05 unless the claim says otherwise) must lie wholly on the "
         "claimed side (beyond the margin) to be reproduced, wholly on the other side to be not "
         "reproduced; otherwise, or with fewer than min_n replicates a side, inconclusive."]
    return Section("Claims", paragraphs=p, tables=[table])


# -- figures ---------------------------------------------------------------------------------

def _series(cells: Sequence[Obs], runs: SweepRuns, metric: str) -> list:
    return [runs.cells[o.cell_id].histories.get(metric, []) for o in cells
            if o.state in ENDED and o.cell_id in runs.cells]


def _label(d: dict) -> str:
    return fmt_params(d, ", ") or "all"


CurveSpec = tuple[str, str, list[tuple[str, list[Obs]]]]   # title, metric, [(label, cells)]


def _curve_specs(ctx: _Ctx) -> list[CurveSpec]:
    """The curve figures to draw and the cells each line averages: only these runs' metric
    histories are fetched (a few groups' seeds, not the whole sweep's)."""
    spec, obs = ctx.spec, ctx.obs
    m, mode = spec.metric.name, spec.metric.mode
    # Learning curves: the selection's chosen configurations, else the best ones.
    sel = spec.selection
    if ctx.chosen is not None:
        groups = [(_label({**g.group, **g.chosen}), g.cells) for g in ctx.chosen if g.chosen]
        which = (f"each {', '.join(sel.group_by)} at its selected {', '.join(sel.over)}, "
                 f"chosen on {sel.select_by}")
    else:
        groups = []
        for cfg, _s in rank_configs(obs, m, mode)[:8]:
            groups.append((_label(cfg), [o for o in obs
                                         if all(o.params.get(k) == v for k, v in cfg.items())]))
        ranked = len(rank_configs(obs, m, mode))
        which = (f"every configuration ({ranked})" if ranked <= min(8, figs.MAX_LINES) else
                 f"the {min(8, figs.MAX_LINES)} best of {ranked} configurations by final {m}")
    out = [(f"Learning curves of {m} (mean ± std over seeds): {which}", m, groups[:figs.MAX_LINES])]
    names = ctx.runs.metric_names()
    if "method" in ctx.swept:
        methods = list(dict.fromkeys(o.params["method"] for o in obs))[:figs.MAX_LINES]
        picked = [(str(meth), ctx.pick({"method": meth})[1]) for meth in methods]
        others = [p for p in ctx.swept if p != "method"]
        by = sel.select_by if (sel and ctx.chosen is not None) else m
        at = f"each method at its selected {', '.join(others)}, chosen on {by}" if others else "each method"
        # test/* metrics come once, at the end: no curve to draw
        over_time = sorted((n for n in names if not n.startswith("test/")),
                           key=lambda n: (not n.startswith("valid/"), n))
        for pat, what in (("bpc", "Bits per character"), ("length", "Copy curriculum length"),
                          ("curriculum", "Copy curriculum"),
                          ("acc/mean", "Mean accuracy over the tasks seen")):
            for metric in [n for n in over_time if pat in n][:2]:
                if pat == "curriculum" and "length" in metric:
                    continue
                if metric == m and not others:  # the first figure draws these same lines
                    continue
                out.append((f"{what} ({metric}) against steps: {at}", metric, picked))
    return out


def _needed_histories(specs: Sequence[CurveSpec]) -> dict[str, set[str]]:
    """metric -> run ids whose history the curve figures draw."""
    need: dict[str, set[str]] = {}
    for _, metric, groups in specs:
        for _, cells in groups:
            need.setdefault(metric, set()).update(
                o.run_id for o in cells if o.state in ENDED and o.run_id)
    return need


def _figures(ctx: _Ctx, specs: Sequence[CurveSpec]) -> list[figs.Figure]:
    spec, runs, obs = ctx.spec, ctx.runs, ctx.obs
    m, mode = spec.metric.name, spec.metric.mode
    out: list = []
    for title, metric, groups in specs[:1]:
        out.append(figs.curves(title, metric, [(lab, _series(c, runs, metric)) for lab, c in groups]))
    logs = _log_params(spec)
    out.append(figs.sensitivity(m, obs, ctx.swept, logs))
    if len(ctx.swept) >= 3:
        configs = [(c, s.mean) for c, s in rank_configs(obs, m, mode) if s.n]
        out.append(figs.parallel_coordinates(m, configs, ctx.swept, mode, logs))
    for title, metric, groups in specs[1:]:
        out.append(figs.curves(title, metric, [(lab, _series(c, runs, metric)) for lab, c in groups]))
    names = runs.metric_names()
    if "method" in ctx.swept:
        methods = list(dict.fromkeys(o.params["method"] for o in obs))
        tasks = sorted((n for n in names if n.startswith("acc/task_")),
                       key=lambda n: int(n.rsplit("_", 1)[1]) if n.rsplit("_", 1)[1].isdigit() else 0)
        if tasks:
            per_method = []
            for meth in methods:
                _, cells = ctx.pick({"method": meth})
                per = {}
                for i, t in enumerate(tasks):
                    vals = [o.metrics[t] for o in cells if o.state == "done" and t in o.metrics]
                    if vals:
                        per[i] = vals
                per_method.append((str(meth), per))
            out.append(figs.per_task("Accuracy on each task after the last task, per method",
                                     per_method, "accuracy"))
    if "lambda_cache" in ctx.swept and "lambda_mbpa" in ctx.swept:
        ppl = next((n for n in names if "ppl" in n or "perplexity" in n), m)
        pmode = "min" if ppl != m else mode
        grid: dict = {}
        for cfg, s in rank_configs(obs, ppl, pmode):
            if s.n:
                k = (cfg.get("lambda_cache"), cfg.get("lambda_mbpa"))
                if k not in grid or (s.mean < grid[k] if pmode == "min" else s.mean > grid[k]):
                    grid[k] = s.mean
        out.append(figs.heatmap(f"{ppl} over (lambda_cache, lambda_mbpa), best over the rest",
                                "lambda_cache", "lambda_mbpa", grid, ppl, pmode))
    return [f for f in out if f is not None]


def _log_params(spec) -> list[str]:
    """The swept parameters whose domain is logarithmic (``pow10``, ``loguniform``): on log axes."""
    return [name for name, d in dict(getattr(spec, "parameters", {}) or {}).items()
            if type(d).__name__ in ("Pow10", "LogUniform")]
