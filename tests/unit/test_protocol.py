"""The selection protocol and the claim judge, on constructed results (no MLflow)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from hpsweep.spec.protocol import Claim, Selection
from hpsweep.store.runs import CellRun, SweepRuns
from hpsweep.views.stats import (
    apply_selection,
    completeness,
    judge_claims,
    observations,
    rank_configs,
    stat,
)


def _sweep(results, statuses=None):
    """results: list of (params, seed, {metric: value} or None for no run)."""
    plan, cells = [], {}
    statuses = statuses or {}
    for i, (params, seed, metrics) in enumerate(results):
        cid = f"c{i:03d}"
        plan.append(SimpleNamespace(id=cid, params=params, seed=seed))
        if metrics is not None:
            st = statuses.get(cid, "FINISHED")
            state = {"FINISHED": "done", "RUNNING": "running"}.get(st, "failed")
            cells[cid] = CellRun(cid, f"run{i}", state, st, seed, dict(params), {}, metrics, {},
                                 0, 0)
    return plan, SweepRuns("s", None, "1", "parent", cells)


SNAP_VALID = {  # (method, lr) -> mean valid/bpc; the best lr differs per method
    ("bptt", 1e-3): 1.50, ("bptt", 1e-4): 1.70,
    ("snap1", 1e-3): 1.65, ("snap1", 1e-4): 1.55,
}


def _snap_results(test_shift=None, seeds=(0, 1, 2)):
    test_shift = test_shift or {}
    out = []
    for (method, lr), v in SNAP_VALID.items():
        for s in seeds:
            wobble = (s - 1) * 0.01
            test = v + 0.02 + wobble + test_shift.get(method, 0.0)
            out.append(({"method": method, "lr": lr}, s, {"valid/bpc": v + wobble, "test/bpc": test}))
    return out


def test_selection_picks_best_mean_over_seeds_per_group():
    plan, runs = _sweep(_snap_results())
    sel = Selection(group_by=["method"], select_by="valid/bpc", over=["lr"], report=["test/bpc"])
    got = {g.group["method"]: g for g in apply_selection(sel, observations(plan, runs), "min")}
    assert got["bptt"].chosen == {"lr": 1e-3}
    assert got["snap1"].chosen == {"lr": 1e-4}
    rep = got["snap1"].report["test/bpc"]
    want = [1.55 + 0.02 + (s - 1) * 0.01 for s in range(3)]
    assert rep.n == 3 and rep.N == 3
    assert rep.mean == pytest.approx(sum(want) / 3)
    assert rep.std == pytest.approx(math.sqrt(sum((w - sum(want) / 3) ** 2 for w in want) / 2))
    # mode max flips the choice
    sel_max = Selection(group_by=["method"], select_by="valid/bpc", over=["lr"], mode="max")
    got = {g.group["method"]: g.chosen for g in apply_selection(sel_max, observations(plan, runs), "min")}
    assert got == {"bptt": {"lr": 1e-4}, "snap1": {"lr": 1e-3}}


def test_selection_tunes_on_one_split_and_reports_the_others():
    # Split 0 prefers alpha=0.1, the other splits would prefer 0.5: the protocol must pick
    # on split 0 only, then average the test metric over splits 1 and 2 only.
    res = []
    for alpha, per_split in {0.1: [0.9, 0.80, 0.82], 0.5: [0.7, 0.95, 0.97]}.items():
        for split, acc in enumerate(per_split):
            res.append(({"alpha": alpha, "split": split}, 0, {"valid/acc": acc, "test/acc": acc - 0.01}))
    plan, runs = _sweep(res)
    sel = Selection(select_by="valid/acc", mode="max", over=["alpha"], report=["test/acc"],
                    select_on={"split": 0}, report_exclude={"split": 0})
    (g,) = apply_selection(sel, observations(plan, runs), "max")
    assert g.chosen == {"alpha": 0.1}
    assert g.report["test/acc"].n == 2
    assert g.report["test/acc"].mean == pytest.approx((0.80 + 0.82) / 2 - 0.01)


def _claim(**kw):
    base = dict(id="snap-near-bptt", text="SnAp-1 within 0.05 of BPTT", kind="within",
                metric="test/bpc", left={"method": "snap1"}, right={"method": "bptt"}, margin=0.1)
    return Claim(**{**base, **kw})


def test_claim_flips_with_the_results():
    sel = Selection(group_by=["method"], select_by="valid/bpc", over=["lr"], report=["test/bpc"])
    claims = [_claim(), _claim(id="lt", kind="less", margin=0.0, text="snap1 below bptt")]
    for shift, want in [({}, ["reproduced", "not reproduced"]),
                        ({"snap1": 0.5}, ["not reproduced", "not reproduced"]),
                        ({"snap1": -0.3}, ["not reproduced", "reproduced"])]:
        plan, runs = _sweep(_snap_results(shift))
        obs = observations(plan, runs)
        chosen = apply_selection(sel, obs, "min")
        got = [v.verdict for v in judge_claims(claims, obs, metric="valid/bpc", mode="min",
                                               selection=sel, chosen=chosen)]
        assert got == want, (shift, got)


def test_claim_sides_use_the_configuration_tuned_on_validation():
    # Without a selection block, each side is the config with the best mean sweep metric
    # (valid/bpc): snap1 at lr=1e-4 and bptt at lr=1e-3 -- not the best test value.
    plan, runs = _sweep(_snap_results())
    (v,) = judge_claims([_claim()], observations(plan, runs), metric="valid/bpc", mode="min")
    (c,) = v.comparisons
    assert c["left_config"] == {"lr": 1e-4, "method": "snap1"}
    assert c["right_config"] == {"lr": 1e-3, "method": "bptt"}
    assert c["d"] == pytest.approx(0.05)


def test_order_claim_and_too_few_seeds_is_inconclusive():
    res = []
    for method, acc in {"mbpa": 0.9, "ewc": 0.8, "sgd": 0.6}.items():
        for s in range(3):
            res.append(({"method": method}, s, {"acc/mean": acc + 0.005 * s}))
    order = Claim(id="o", text="MbPA > EWC > SGD", kind="order", metric="acc/mean",
                  direction="decreasing", order=[{"method": "mbpa"}, {"method": "ewc"}, {"method": "sgd"}])
    plan, runs = _sweep(res)
    (v,) = judge_claims([order], observations(plan, runs), metric="acc/mean", mode="max")
    assert v.verdict == "reproduced" and len(v.comparisons) == 2
    # one seed per method: no spread to judge from
    plan1, runs1 = _sweep([r for r in res if r[1] == 0])
    (v1,) = judge_claims([order], observations(plan1, runs1), metric="acc/mean", mode="max")
    assert v1.verdict == "inconclusive" and "need 2" in v1.reason
    # a side with no cells at all
    gone = Claim(id="g", text="x", kind="greater", metric="acc/mean",
                 left={"method": "nope"}, right={"method": "sgd"})
    (v2,) = judge_claims([gone], observations(plan, runs), metric="acc/mean", mode="max")
    assert v2.verdict == "inconclusive"


def test_pair_by_compares_within_each_network():
    res = []
    for cell in ("gru", "lstm"):
        for method, bpc in {"snap1": 1.60, "rtrl": 1.58}.items():
            for s in range(3):
                shift = 0.4 if (cell == "lstm" and method == "snap1") else 0.0
                res.append(({"method": method, "cell": cell}, s, {"bpc": bpc + shift + 0.01 * s}))
    claim = Claim(id="p", text="SnAp-1 near RTRL", kind="within", metric="bpc", margin=0.05,
                  left={"method": "snap1"}, right={"method": "rtrl"}, pair_by=["cell"])
    plan, runs = _sweep(res)
    (v,) = judge_claims([claim], observations(plan, runs), metric="bpc", mode="min")
    by_cell = {c["pair"]["cell"]: c["verdict"] for c in v.comparisons}
    assert by_cell == {"gru": "reproduced", "lstm": "not reproduced"}
    assert v.verdict == "not reproduced"


def test_partial_sweep_shows_missing_cells_and_never_averages_them_away():
    res = _snap_results()
    res[0] = (res[0][0], res[0][1], None)          # pending: never ran
    plan, runs = _sweep(res, statuses={"c001": "FAILED", "c002": "RUNNING"})
    comp = completeness(plan, runs)
    assert comp.counts == {"done": 9, "stopped": 0, "running": 1, "failed": 1, "interrupted": 0, "pending": 1,
                           "stale": 0}
    row_params, by_seed = comp.rows[0]
    assert row_params == {"method": "bptt", "lr": 1e-3}
    assert [by_seed[s].state for s in (0, 1, 2)] == ["pending", "failed", "running"]
    obs = observations(plan, runs)
    s = stat([o for o in obs if o.params["method"] == "bptt" and o.params["lr"] == 1e-3], "test/bpc")
    assert (s.n, s.N) == (0, 3) and math.isnan(s.mean) and s.fmt() == "— (0/3)"
    ranked = rank_configs(obs, "valid/bpc", "min")
    assert ranked[-1][0] == {"lr": 1e-3, "method": "bptt"} and ranked[-1][1].n == 0
    # an orphan run (not in the plan) is listed apart, not in the matrix
    runs.cells["zzz"] = CellRun("zzz", "r", "done", "FINISHED", 0, {"lr": 1}, {}, {}, {}, 0, 0)
    comp = completeness(plan, runs)
    assert [o.cell_id for o in comp.orphans] == ["zzz"] and comp.total == 12


@pytest.mark.parametrize("bad, msg", [
    (dict(kind="within", margin=0.0), "margin > 0"),
    (dict(kind="order"), "needs `order`"),
    (dict(kind="less", right=None), "needs both"),
    (dict(kind="less", colour="red"), "Extra inputs"),
])
def test_claim_model_refuses_bad_claims(bad, msg):
    base = dict(id="x", text="t", metric="m", left={"a": 1}, right={"a": 2})
    with pytest.raises(ValidationError, match=msg):
        Claim(**{**base, **bad})


def test_selection_model_refuses_overlap_and_unknown_keys():
    with pytest.raises(ValidationError, match="must not share"):
        Selection(group_by=["lr"], select_by="m", over=["lr"])
    with pytest.raises(ValidationError, match="Extra inputs"):
        Selection(select_by="m", over=["lr"], reprot=["m"])


PAPER_CLAIMS = """
- id: snap1-near-rtrl
  text: SnAp-1 is within 0.05 bits/char of RTRL on the same network
  source: Menick et al. 2021, Table 1
  kind: within
  metric: test/bpc
  margin: 0.05
  left: {method: snap1}
  right: {method: rtrl}
  pair_by: [cell, sparsity]
- id: snap-longer-copy
  text: SnAp reaches longer Copy lengths than truncated BPTT
  kind: greater
  metric: copy/length
  left: {method: [snap1, snap2]}
  right: {method: bptt}
- id: mbpa-ewc-sgd
  text: after the last task, mean accuracy MbPA > EWC > SGD
  kind: order
  direction: decreasing
  metric: acc/mean
  order: [{method: mbpa}, {method: ewc}, {method: sgd}]
- id: cache-mbpa-lm
  text: perplexity cache+MbPA < cache < LSTM
  kind: order
  direction: increasing
  metric: test/ppl
  order:
    - {lambda_cache: 0.15, lambda_mbpa: 0.1}
    - {lambda_cache: 0.15, lambda_mbpa: 0.0}
    - {lambda_cache: 0.0, lambda_mbpa: 0.0}
"""


def test_the_papers_claims_can_be_written():
    import yaml

    claims = [Claim.model_validate(c) for c in yaml.safe_load(PAPER_CLAIMS)]
    assert [c.kind for c in claims] == ["within", "greater", "order", "order"]
    # and judged: cache+MbPA < cache < LSTM on constructed perplexities
    res = []
    for (lc, lm), ppl in {(0.15, 0.1): 70.0, (0.15, 0.0): 75.0, (0.0, 0.0): 82.0}.items():
        for s in range(3):
            res.append(({"lambda_cache": lc, "lambda_mbpa": lm}, s, {"test/ppl": ppl + 0.3 * s}))
    plan, runs = _sweep(res)
    (v,) = judge_claims(claims[3:], observations(plan, runs), metric="test/ppl", mode="min")
    assert v.verdict == "reproduced"
