"""The link `hpsweep run` prints lands on the sweep's cells in the MLflow UI (3.x), not on the
experiment's GenAI overview: the cell runs only (the sweep's parent filtered out), best first,
with the swept parameters, the seed and the metric as visible columns (the saved view the run
writes on the experiment): a real `mlflow server`, a real sweep, headless Chromium."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

HPSWEEP = str(Path(sys.executable).with_name("hpsweep"))
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run"]


def _dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (and fetched the runs from the server)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: `make browser` (apt-get install -y chromium)")
    out = subprocess.run([chromium, *_FLAGS, f"--user-data-dir={profile}", "--window-size=2400,1000",
                          "--virtual-time-budget=30000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180)
    assert "<html" in out.stdout, out.stderr[-3000:]
    return out.stdout


def test_printed_link_opens_the_sweeps_runs(tmp_path, mlflow_server, moto_server) -> None:
    name = f"browse-{secrets.token_hex(3)}"
    sweep = tmp_path / f"{name}.yaml"
    sweep.write_text(f"name: {name}\ntrainer: sleep\nmetric: {{name: loss, mode: min}}\n"
                     "config: {reports: 2, sleep: 0.01}\nparameters:\n  x: {grid: [0.5, 1.5]}\n"
                     "seeds: 2\n")
    ray_tmp = Path("/tmp") / f"hpb{secrets.token_hex(3)}"  # Ray's socket paths must stay short
    ray_tmp.mkdir()
    env = {**os.environ, **moto_server.env, "MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(ray_tmp)}
    proc = subprocess.run([HPSWEEP, "run", str(sweep), "--tracking-uri", mlflow_server.url,
                           "--storage", str(tmp_path / "storage"), "--no-live"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    link = re.search(r"browse the runs: (\S+)", proc.stdout)
    assert link, proc.stdout
    url = link.group(1)

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name(name)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert url.startswith(f"{mlflow_server.url}/#/experiments/{exp.experiment_id}/runs")
    assert "viewStateShareKey=" in url and "mlflow.sharedViewState.hpsweep-cells" in exp.tags
    cells = client.search_runs([exp.experiment_id], "tags.`hpsweep.role` = 'cell'")
    names = sorted(r.info.run_name for r in cells)
    assert names == ["x=0.5 seed=0", "x=0.5 seed=1", "x=1.5 seed=0", "x=1.5 seed=1"]

    dom = _dom(url, tmp_path / "profile")
    missing = [n for n in names if n not in dom]
    assert not missing, f"the page at {url} does not list the cells' runs {missing}"
    # best first: the link sorts by the sweep metric (min), so x=0.5 comes before x=1.5
    assert max(dom.index(n) for n in names[:2]) < min(dom.index(n) for n in names[2:])
    # the grid: the swept parameter, the seed and the metric are columns the page shows (the
    # table's column ids, as the UI names them), and the parent run is not a row
    columns = set(re.findall(r'col-id="([^"]+)"', dom))
    assert {"params.`x`", "params.`seed`", "metrics.`loss`"} <= columns, sorted(columns)
    assert re.search(r">\s*4\s*</strong>\s*matching runs", dom), "4 cells listed, not the parent as a 5th"

    # the control: the experiment's bare address does not show the cells (the overview, or
    # the runs collapsed under the sweep's parent), so the check above can fail
    bare = _dom(f"{mlflow_server.url}/#/experiments/{exp.experiment_id}", tmp_path / "profile2")
    assert not all(n in bare for n in names)
    assert "params.`x`" not in set(re.findall(r'col-id="([^"]+)"', bare))
