"""`hpsweep report` end to end: a small real sweep (the `sleep` trainer's own metrics) tracked to
a real `mlflow server`, partly finished; every number in the report's tables is recomputed
straight from MLflow's metric histories; the HTML opens in a real headless Chromium."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/report_support.py
from report_support import SLEEP_SPEC, ReportPage, log_sweep, run_sleep  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracked(mlflow_server):
    """A sweep of 24 cells: one never ran, one failed, one still running, the rest finished."""
    from mlflow.tracking import MlflowClient

    from hpsweep.spec.model import load_spec_text
    from hpsweep.spec.plan import plan

    name = f"report-{uuid.uuid4().hex[:8]}"
    spec = load_spec_text(SLEEP_SPEC.format(name=name))
    cells = plan(spec)
    client = MlflowClient(mlflow_server.url)
    odd = {cells[0].id: None, cells[5].id: "FAILED", cells[10].id: "RUNNING"}
    eid, pid = log_sweep(client, name, cells, lambda c: run_sleep(c.config),
                         lambda c: odd.get(c.id, "FINISHED"))
    return SimpleNamespace(spec=spec, cells=cells, client=client, eid=eid, pid=pid, odd=odd,
                            url=mlflow_server.url)


@pytest.fixture(scope="module")
def report(tracked, tmp_path_factory):
    from hpsweep.views.report import build_report

    out = tmp_path_factory.mktemp("report")
    timings: dict = {}
    html, md = build_report(tracked.url, tracked.spec, out, timings=timings)
    return html, md, timings


def _final(client, run_id: str, metric: str) -> float:
    """The value at the largest step, straight from MLflow's metric history."""
    hist = client.get_metric_history(run_id, metric)
    return max(hist, key=lambda m: (m.step, m.timestamp)).value


def test_every_table_number_equals_mlflow_history(tracked, report):
    html, md, _ = report
    page = ReportPage()
    page.feed(html.read_text())
    client = tracked.client
    assert len(page.stats) >= 12
    for s in page.stats:
        ids = [r for r in s["data-runs"].split(",") if r]
        for rid in ids:  # only finished runs are averaged
            assert client.get_run(rid).info.status == "FINISHED"
        vals = [_final(client, rid, s["data-metric"]) for rid in ids]
        mean = sum(vals) / len(vals)
        assert float(s["data-mean"]) == pytest.approx(mean, rel=1e-12, abs=1e-12)
        assert int(s["data-n"]) == len(vals)
        if len(vals) > 1:
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
            assert float(s["data-std"]) == pytest.approx(std, rel=1e-9, abs=1e-12)
        shown = s["text"].split(" ± ")[0]
        assert shown == f"{mean:.4g}", s
        planned = int(s["data-planned"])
        assert f"(n={len(vals)}/{planned})" in s["text"]


def test_selection_picks_what_the_histories_say(tracked, report):
    """Per x, the `reports` value with the lowest mean final loss over finished seeds,
    recomputed from MLflow alone; the report's selection rows must name those runs."""
    html, md, _ = report
    client = tracked.client
    runs = client.search_runs([tracked.eid], "tags.`hpsweep.role` = 'cell'", max_results=1000)
    groups: dict = {}
    for r in runs:
        if r.info.status != "FINISHED":
            continue
        p = json.loads(r.data.tags["hpsweep.params"])
        groups.setdefault(p["x"], {}).setdefault(p["reports"], []).append(
            (r.info.run_id, _final(client, r.info.run_id, "loss")))
    want = {}
    for x, by_reports in groups.items():
        best = min(by_reports, key=lambda k: sum(v for _, v in by_reports[k]) / len(by_reports[k]))
        want[x] = {rid for rid, _ in by_reports[best]}
    page = ReportPage()
    page.feed(html.read_text())
    chosen = {frozenset(s["data-runs"].split(",")) for s in page.stats
              if s["table"] == "selection" and s["data-metric"] == "loss"}
    assert chosen == {frozenset(w) for w in want.values()}


def test_partial_sweep_claims_links_and_artifacts(tracked, report):
    html, md, timings = report
    text = md.read_text()
    assert "Cells: 24 planned: 21 done, 1 running, 1 failed, 0 interrupted, 1 pending." in text
    assert text.count("| missing |") == 1
    assert "| zero-beats-half |" in text and "**reproduced**" in text
    assert "| zero-above-half | x=0 reaches a higher loss than x=0.5 (false) | **not reproduced**" in text
    page = ReportPage()
    page.feed(html.read_text())
    run_links = [l for l in page.links if "/runs/" in l]
    assert run_links and all(l.startswith(f"{tracked.url}/#/experiments/{tracked.eid}/runs/")
                             for l in run_links)
    # every run that exists is linked from the completeness matrix
    for r in tracked.client.search_runs([tracked.eid], "tags.`hpsweep.role` = 'cell'"):
        assert f"{tracked.url}/#/experiments/{tracked.eid}/runs/{r.info.run_id}" in run_links
    arts = {a.path for a in tracked.client.list_artifacts(tracked.pid, "report")}
    assert {"report/report.html", "report/report.md"} <= arts
    assert timings["runs"] == 23


# -- the HTML in a real browser ----------------------------------------------------------------

def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        # the test set-up installs Debian's chromium where it can (what .ci/run does)
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True,
                       timeout=600, capture_output=True)
        if shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.fail("chromium is not installed and could not be installed with apt-get "
                "(apt-get install -y chromium)")


_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
_PROBE_HEAD = ("<script>window.__errs=[];addEventListener('error',function(e){__errs.push("
               "String(e.message||(e.target&&(e.target.src||'').slice(0,40))))},true);</script>")
_PROBE_TAIL = ("<script>addEventListener('load',function(){var r={errors:__errs,imgs:[].map.call("
               "document.images,function(i){return [i.complete,i.naturalWidth]})};var p=document."
               "createElement('pre');p.id='__probe';p.textContent=JSON.stringify(r);"
               "document.body.appendChild(p)});</script>")


def _probe(chromium: str, html_text: str, tmp: Path) -> dict:
    """Open a copy of the page with a probe script; return its errors and image sizes."""
    page = tmp / "probe.html"
    page.write_text(html_text.replace("<head>", "<head>" + _PROBE_HEAD, 1)
                    .replace("</body>", _PROBE_TAIL + "</body>"), encoding="utf-8")
    out = subprocess.run([chromium, *_FLAGS, f"--user-data-dir={tmp / 'profile'}",
                          "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    start = out.stdout.find('<pre id="__probe">')
    assert start >= 0, f"the page did not finish loading:\n{out.stderr[-3000:]}"
    body = out.stdout[start + len('<pre id="__probe">'):out.stdout.find("</pre>", start)]
    import html as html_mod

    return json.loads(html_mod.unescape(body))


def test_html_opens_in_headless_chromium(report, tmp_path):
    import matplotlib.image as mpimg

    chromium = _chromium()
    html, _, _ = report
    text = html.read_text()
    got = _probe(chromium, text, tmp_path)
    assert got["errors"] == []
    assert len(got["imgs"]) >= 2 and all(ok and w > 0 for ok, w in got["imgs"]), got
    # the probe itself can tell a broken figure: a corrupted image fails it
    broken = text.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAAA", 1)
    bad = _probe(chromium, broken, tmp_path)
    assert bad["errors"] and any(w == 0 for _, w in bad["imgs"])
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}",
                    "--window-size=1200,1600", f"--screenshot={shot}", html.as_uri()],
                   capture_output=True, timeout=120)
    img = mpimg.imread(shot)[..., :3]
    non_white = (img.min(axis=2) < 0.9).mean()
    assert img.std() > 0.05 and non_white > 0.02, (img.std(), non_white)
