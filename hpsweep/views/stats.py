"""Statistics of a sweep's results, the one place they are computed: used by ``hpsweep results``,
``status`` and ``report`` alike.

Observations: one per planned cell (:func:`observations`). Aggregation over seeds (:func:`stat`,
:func:`aggregate`): mean and sample std (ddof=1) over the finished cells with a finite value,
``n`` finished of ``N`` planned, the rest missing -- never averaged away. With n = 1 the std is
undefined (NaN, shown as a dash everywhere); with n = 0 so is the mean.

The selection protocol and the claims (models in :mod:`hpsweep.spec.protocol`):

``selection`` says how the paper picked what it reports: within each group (``group_by``), the
value of the ``over`` parameters with the best mean ``select_by`` over replicates; then the
``report`` metrics of that configuration as mean +- std (n). Replicates are the cells that share
the group and ``over`` values: the seeds, and any swept parameter named in neither list (e.g. the
data splits of MbPA's permuted MNIST). ``select_on`` / ``report_on`` / ``report_exclude``
restrict which cells choose and which report (tune on split 0, report on the others).

``claims`` are the paper's qualitative statements, each judged from the measured spread:

- ``less`` / ``greater``: left's mean below / above right's;
- ``within``: ``|mean(left) - mean(right)| <= margin``;
- ``order``: the sides in ``order`` increase (or decrease) along the list.

The rule: for each compared pair, the Welch (unequal variance) ``1 - 2*alpha`` confidence
interval of ``d = mean(left) - mean(right)`` over the per-replicate final values (alpha 0.05 by
default: a one-sided 5 % test). ``less`` is reproduced when the whole interval lies below
``-margin`` (margin 0 by default), not reproduced when it lies at or above 0, else
inconclusive; ``greater`` mirrors it; ``within`` is reproduced when the interval lies inside
``[-margin, margin]`` (two one-sided tests), not reproduced when it lies wholly outside, else
inconclusive. A side with fewer than ``min_n`` finished replicates (or no matching cells) makes
the claim inconclusive. With ``pair_by``, the comparison is made within each value of those
parameters (SnAp-1 against RTRL on the same network) and the claim is reproduced only if every
pair is, not reproduced if any pair is not.

Each side's sample is the replicates of ONE configuration: among the done cells matching the
side's filter (restricted to the configurations the selection protocol chose, when there is
one), the configuration with the best mean selection metric (``select_by``, else the sweep's
metric) -- tuned on validation, never on the claim's own (test) metric.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from hpsweep.fmt import fmt_value
from hpsweep.spec.protocol import Claim, Match, Selection
from hpsweep.store.runs import ENDED, STATES

__all__ = [
    "Obs", "Stat", "GroupChoice", "Verdict", "CellState", "Completeness",
    "observations", "completeness", "matches", "mean_std", "stat", "aggregate", "rank_configs",
    "apply_selection", "judge_claims", "pick_configuration",
]


# -- observations ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Obs:
    """One cell: swept values plus ``seed``, its state, final metrics and run id (or None)."""

    cell_id: str
    params: dict[str, Any]
    state: str
    metrics: dict[str, float]
    run_id: str | None
    steps: dict[str, int] = dataclasses.field(default_factory=dict)  # the step of each final metric


def observations(cells_from_plan: Iterable[Any] | None, sweep_runs) -> list[Obs]:
    """Planned cells (``.id``, ``.params``, ``.seed``) joined with their runs; pending cells
    have no metrics. Without a plan, the runs alone (nothing can be known to be missing)."""
    out = []
    if cells_from_plan is None:
        for cid, r in sorted(sweep_runs.cells.items()):
            out.append(Obs(cid, {**r.params, "seed": r.seed}, r.status, r.metrics, r.run_id, r.steps))
        return out
    for cell in cells_from_plan:
        r = sweep_runs.cells.get(cell.id)
        out.append(Obs(
            cell.id, {**dict(cell.params), "seed": cell.seed},
            r.status if r else "pending", dict(r.metrics) if r else {}, r.run_id if r else None,
            dict(r.steps) if r else {},
        ))
    return out


# -- completeness ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CellState:
    """One planned (or orphaned) cell and its state."""

    cell_id: str
    params: dict[str, Any]
    seed: int | None
    state: str                  # done | running | failed | pending | orphan
    run_id: str | None


@dataclasses.dataclass(frozen=True)
class Completeness:
    """The completeness matrix: rows are configurations (swept values), columns are seeds.

    ``cells`` lists every planned cell in plan order; ``orphans`` are runs in MLflow that the
    plan does not produce (the YAML changed since they ran); ``counts`` counts the states.
    """

    cells: list[CellState]
    orphans: list[CellState]
    seeds: list[int]
    rows: list[tuple[dict[str, Any], dict[int, CellState]]]

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(s.state for s in self.cells)
        return {state: c.get(state, 0) for state in STATES}

    @property
    def total(self) -> int:
        return len(self.cells)


def completeness(cells_from_plan: Iterable[Any], sweep_runs) -> Completeness:
    """Line the plan's cells up against the runs: done / running / failed / pending per cell.

    ``cells_from_plan``: objects with ``.id``, ``.params`` (swept values) and ``.seed`` (what
    :func:`hpsweep.spec.plan.plan` returns). A planned cell with no run is *pending*; runs whose cell
    id the plan does not produce are listed as ``orphans`` (never mixed into the matrix).
    """
    cells: list[CellState] = []
    planned = set()
    for cell in cells_from_plan:
        planned.add(cell.id)
        run = sweep_runs.cells.get(cell.id)
        cells.append(CellState(
            cell.id, dict(cell.params), cell.seed,
            run.status if run else "pending", run.run_id if run else None,
        ))
    orphans = [
        CellState(cid, r.params, r.seed, "orphan", r.run_id)
        for cid, r in sweep_runs.cells.items() if cid not in planned
    ]
    seeds = sorted({c.seed for c in cells if c.seed is not None})
    rows: dict[str, tuple[dict, dict[int, CellState]]] = {}
    for c in cells:
        key = json.dumps(c.params, sort_keys=True, default=str)
        rows.setdefault(key, (c.params, {}))[1][c.seed] = c
    return Completeness(cells, orphans, seeds, list(rows.values()))


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def matches(params: dict[str, Any], match: Match) -> bool:
    """True when every key of ``match`` equals (or, for a list, is one of) the cell's value.
    A parameter the cell does not have (a variant without it) has the value None."""
    for key, want in match.items():
        options = want if isinstance(want, list) else [want]
        if not any(_same(params.get(key), w) for w in options):
            return False
    return True


DASH = "—"   # an undefined number (no finished cell; a std of one value)


def _key(params: dict[str, Any], names: Sequence[str]) -> tuple:
    return tuple(json.dumps(params.get(n), sort_keys=True, default=str) for n in names)


@dataclasses.dataclass(frozen=True)
class Stat:
    """mean +- std over the ``n`` finished replicates of ``N`` planned (std: ddof=1)."""

    mean: float
    std: float
    n: int
    N: int
    values: tuple[float, ...]
    run_ids: tuple[str, ...]
    metric: str = ""
    seeds: tuple[Any, ...] = ()
    steps: tuple[int | None, ...] = ()   # the step each value comes from (None: not known)
    stopped: int = 0                     # values from cells the scheduler stopped early

    def step_text(self) -> str:
        """The step the values come from: ``8``, or ``2-8`` when they differ; '' if unknown."""
        known = sorted({s for s in self.steps if s is not None})
        if not known:
            return ""
        return str(known[0]) if len(known) == 1 else f"{known[0]}-{known[-1]}"

    @property
    def missing(self) -> int:
        """Planned cells without a finished, finite value (pending, running, failed)."""
        return self.N - self.n

    def mean_text(self) -> str:
        return DASH if self.n == 0 else fmt_value(self.mean)

    def std_text(self) -> str:
        return DASH if math.isnan(self.std) else fmt_value(self.std)

    def fmt(self) -> str:
        if self.n == 0:
            return f"{DASH} (0/{self.N})"
        return f"{self.mean_text()} ± {self.std_text()} (n={self.n}/{self.N})"

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: undefined mean / std as None."""
        return {"mean": None if self.n == 0 else self.mean,
                "std": None if math.isnan(self.std) else self.std, "n": self.n,
                "missing": self.missing, "values": list(self.values), "seeds": list(self.seeds),
                "steps": list(self.steps), "stopped": self.stopped}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of ``values``: NaN where undefined (no value; one value)."""
    n = len(values)
    mean = math.fsum(values) / n if n else math.nan
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def stat(obs: Sequence[Obs], metric: str) -> Stat:
    """Mean and sample std of ``metric`` over the done cells in ``obs`` (N counts them all)."""
    used = [o for o in obs if o.state in ENDED and metric in o.metrics and math.isfinite(o.metrics[metric])]
    vals = [float(o.metrics[metric]) for o in used]
    mean, std = mean_std(vals)
    return Stat(mean, std, len(vals), len(obs), tuple(vals), tuple(o.run_id for o in used), metric,
                tuple(o.params.get("seed") for o in used), tuple(o.steps.get(metric) for o in used),
                sum(o.state == "stopped" for o in used))


def _better(mode: str):
    return (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)


def _configs(obs: Sequence[Obs], names: Sequence[str]) -> dict[tuple, list[Obs]]:
    out: dict[tuple, list[Obs]] = {}
    for o in obs:
        out.setdefault(_key(o.params, names), []).append(o)
    return out


def aggregate(obs: Sequence[Obs], metric: str, mode: str,
              group_by: Sequence[str] | None = None) -> list[tuple[dict, Stat]]:
    """``metric`` over the replicates of each configuration (every swept value but the seed),
    or of each ``group_by`` group (aggregating over the other parameters too): best mean first
    (``mode``), groups with no finished cell last, in plan order among equals."""
    names = list(group_by) if group_by is not None else list(
        dict.fromkeys(k for o in obs for k in o.params if k != "seed"))
    ranked = [({n: group[0].params.get(n) for n in names}, stat(group, metric))
              for group in _configs(obs, names).values()]
    sign = 1 if mode == "min" else -1
    ranked.sort(key=lambda cs: (cs[1].n == 0, sign * cs[1].mean if cs[1].n else 0.0))
    return ranked


def rank_configs(obs: Sequence[Obs], metric: str, mode: str) -> list[tuple[dict, Stat]]:
    """Configurations (every swept value but the seed) ranked by mean ``metric`` over seeds."""
    return aggregate(obs, metric, mode)


# -- selection ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GroupChoice:
    """The result of the selection protocol for one group."""

    group: dict[str, Any]
    chosen: dict[str, Any] | None                # the over values picked (None: nothing done)
    candidates: list[tuple[dict[str, Any], Stat]]  # every over value, its select_by stat
    report: dict[str, Stat]                       # metric -> stat of the chosen configuration
    cells: list[Obs]                              # the chosen configuration's reporting cells


def apply_selection(selection: Selection, obs: Sequence[Obs], default_mode: str) -> list[GroupChoice]:
    """Apply the protocol: per group, the ``over`` values with the best mean ``select_by``
    over their finished replicates, then the ``report`` metrics of that configuration."""
    mode = selection.mode or default_mode
    better = _better(mode)
    out = []
    for group_obs in _configs(obs, selection.group_by).values():
        group = {n: group_obs[0].params.get(n) for n in selection.group_by}
        candidates, best = [], None
        for over_obs in _configs(group_obs, selection.over).values():
            over = {n: over_obs[0].params.get(n) for n in selection.over}
            s = stat([o for o in over_obs if matches(o.params, selection.select_on)],
                     selection.select_by)
            candidates.append((over, s))
            if s.n and (best is None or better(s.mean, best[1].mean)):
                best = (over, s)
        chosen_cells: list[Obs] = []
        if best is not None:
            chosen_cells = [
                o for o in group_obs
                if matches(o.params, best[0]) and matches(o.params, selection.report_on)
                and not (selection.report_exclude and matches(o.params, selection.report_exclude))
            ]
        report = {m: stat(chosen_cells, m) for m in selection.report} if best else {}
        out.append(GroupChoice(group, best[0] if best else None, candidates, report, chosen_cells))
    return out


# -- claims ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Verdict:
    """A judged claim: ``verdict`` is reproduced | not reproduced | inconclusive."""

    claim: Claim
    verdict: str
    reason: str
    comparisons: list[dict[str, Any]]   # per pair: sides' stats, d, ci, verdict


def _welch_ci(a: Stat, b: Stat, alpha: float) -> tuple[float, float, float]:
    from scipy.stats import t as student_t

    d = a.mean - b.mean
    va, vb = (a.std ** 2) / a.n, (b.std ** 2) / b.n
    se = math.sqrt(va + vb)
    if se == 0.0:
        return d, d, d
    df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    half = float(student_t.ppf(1 - alpha, df)) * se
    return d, d - half, d + half


def _compare(kind: str, a: Stat, b: Stat, claim: Claim) -> tuple[str, dict]:
    info: dict[str, Any] = {"left": a, "right": b}
    if a.n < claim.min_n or b.n < claim.min_n:
        return "inconclusive", {**info, "why": f"n={a.n} and n={b.n}, need {claim.min_n} each"}
    d, lo, hi = _welch_ci(a, b, claim.alpha)
    info.update(d=d, ci=(lo, hi))
    m = claim.margin
    if kind == "less":
        v = "reproduced" if hi < -m else "not reproduced" if lo >= 0 else "inconclusive"
    elif kind == "greater":
        v = "reproduced" if lo > m else "not reproduced" if hi <= 0 else "inconclusive"
    else:  # within
        v = ("reproduced" if -m <= lo and hi <= m
             else "not reproduced" if lo > m or hi < -m else "inconclusive")
    return v, info


def pick_configuration(
    obs: Sequence[Obs], match: Match, chosen: Sequence[GroupChoice] | None,
    choose_by: str, mode: str,
) -> tuple[dict | None, list[Obs]]:
    """ONE configuration among the cells matching ``match``, and its replicate cells.

    With a selection protocol's result (``chosen``): among the groups whose chosen
    configuration has reporting cells matching, the group whose choice scored best on
    ``select_by``; its reporting cells. Without: the configuration (all swept values but the
    seed) with the best mean ``choose_by`` among the matching cells; its seeds. When nothing
    finished, ``(None, every matching cell)`` so that callers can count what is missing.
    """
    better = _better(mode)
    cand = [o for o in obs if matches(o.params, match)]
    if chosen is not None:
        best, best_score = None, None
        for g in chosen:
            if g.chosen is None:
                continue
            cells = [o for o in g.cells if matches(o.params, match)]
            score = next(s for over, s in g.candidates if over == g.chosen)
            if cells and (best is None or better(score.mean, best_score)):
                best, best_score = ({**g.group, **g.chosen}, cells), score.mean
        return best if best is not None else (None, cand)
    best_cfg, best_sel = None, None
    for cfg, s in rank_configs(cand, choose_by, mode):
        if s.n and (best_sel is None or better(s.mean, best_sel.mean)):
            best_cfg, best_sel = cfg, s
    if best_cfg is None:
        return None, cand
    return best_cfg, [o for o in cand if all(_same(o.params.get(k), v) for k, v in best_cfg.items())]


def _side(obs: Sequence[Obs], match: Match, chosen: Sequence[GroupChoice] | None,
          choose_by: str, mode: str, metric: str) -> tuple[dict | None, Stat]:
    cfg, cells = pick_configuration(obs, match, chosen, choose_by, mode)
    return cfg, stat(cells, metric)


def judge_claims(
    claims: Sequence[Claim], obs: Sequence[Obs], *, metric: str, mode: str,
    selection: Selection | None = None, chosen: Sequence[GroupChoice] | None = None,
) -> list[Verdict]:
    """Judge each claim by the rule in this module's docstring. ``metric``/``mode``: the
    sweep's metric, used to pick each side's configuration when there is no selection."""
    choose_by, choose_mode = metric, mode
    if selection is not None and chosen is not None:
        choose_by, choose_mode = selection.select_by, selection.mode or mode
    else:
        chosen = None
    verdicts = []
    for claim in claims:
        sides = claim.order if claim.kind == "order" else [claim.left, claim.right]
        pairs: list[tuple[str, Match, Match]] = []
        for i in range(len(sides) - 1):
            kind = claim.kind
            if kind == "order":
                kind = "less" if claim.direction == "increasing" else "greater"
            pairs.append((kind, sides[i], sides[i + 1]))
        keys = sorted({_key(o.params, claim.pair_by) for o in obs}) if claim.pair_by else [()]
        comps = []
        for k in keys:
            pin = dict(zip(claim.pair_by, (json.loads(x) for x in k), strict=True))
            for kind, lm, rm in pairs:
                lcfg, ls = _side(obs, {**lm, **pin}, chosen, choose_by, choose_mode, claim.metric)
                rcfg, rs = _side(obs, {**rm, **pin}, chosen, choose_by, choose_mode, claim.metric)
                if claim.pair_by and (ls.N == 0 or rs.N == 0):
                    continue  # this network has no cells on one side: not a pair
                v, info = _compare(kind, ls, rs, claim)
                comps.append({"pair": pin, "kind": kind, "left_match": lm, "right_match": rm,
                              "left_config": lcfg, "right_config": rcfg, "verdict": v, **info})
        if not comps:
            verdicts.append(Verdict(claim, "inconclusive", "no cells match both sides", comps))
            continue
        states = [c["verdict"] for c in comps]
        if "not reproduced" in states:
            verdict = "not reproduced"
        elif all(s == "reproduced" for s in states):
            verdict = "reproduced"
        else:
            verdict = "inconclusive"
        reason = "; ".join(_describe(c, claim) for c in comps)
        verdicts.append(Verdict(claim, verdict, reason, comps))
    return verdicts


def _describe(c: dict, claim: Claim) -> str:
    where = ", ".join(f"{k}={v}" for k, v in c["pair"].items())
    head = f"[{where}] " if where else ""
    left, right = c["left"], c["right"]
    side = f"{head}{_m(c['left_match'])}: {left.fmt()} vs {_m(c['right_match'])}: {right.fmt()}"
    if "ci" not in c:
        return f"{side}; {c['why']} -> {c['verdict']}"
    lo, hi = c["ci"]
    conf = round(100 * (1 - 2 * claim.alpha))
    return (f"{side}; d={fmt_value(c['d'])}, {conf}% CI [{fmt_value(lo)}, {fmt_value(hi)}] "
            f"-> {c['verdict']}")


def _m(match: Match) -> str:
    return ",".join(f"{k}={v}" for k, v in match.items()) or "all"
