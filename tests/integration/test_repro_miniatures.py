"""Each reproduction sweep (sweeps/repro/) runs end to end as a miniature, through the CLI, and
its report judges every claim (any verdict): the claim wiring cannot rot.

The miniature is the sweep file with its trainer config overridden to seconds (``SHRINK``), two
seeds (claims need two replicates a side to be judged at all) and only the first value of each
parameter the selection protocol tunes (``over``): the same groups, claims and metrics, far
fewer cells. Then ``hpsweep run`` (a stage 1 in sweeps/repro/pre/ first, as make reproduce
does) and ``hpsweep report`` against a private SQLite store, and the claims table read back by
docs/reproductions/index.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
REPRO = ROOT / "sweeps" / "repro"

#: per sweep, the trainer options that make it run in seconds (everything else unchanged)
SHRINK = {
    "snap.copy": {"steps": 30, "eval_every": 15},
    "snap.charlm": {"steps": 4, "eval_every": 2, "eval_batches": 1, "seq_len": 8, "window": 8},
    "mbpa.permuted-mnist": {"num_tasks": 2, "train_per_task": 100, "valid_per_task": 50, "test_per_task": 50,
                            "memory_size": 500},
    "mbpa.incremental": {"train_per_task": 200, "test_per_task": 100, "incremental_updates": 4, "eval_every": 2,
                         "memory_size": 500},
    "mbpa.lm": {"lm_max_steps": 4, "lm_train_tokens": 5000, "lm_eval_tokens": 300, "report_every": 2,
                "memory_size": 100, "neighbours": 16},
}


def test_every_reproduction_has_a_miniature():
    assert set(SHRINK) == {p.stem for p in REPRO.glob("*.yaml")}


def miniature(path: Path, name: str, tmp_path: Path) -> str:
    doc = yaml.safe_load(path.read_text())
    doc["name"] = doc["name"] + "-mini"
    doc["config"].update(SHRINK[name])
    doc["seeds"] = 2
    tuned = set((doc.get("selection") or {}).get("over", []))
    for block in [doc.get("parameters") or {}] + list(doc.get("variants") or []):
        for key, domain in block.items():
            if key in tuned and isinstance(domain, dict):
                kind, values = next(iter(domain.items()))
                if kind in ("grid", "pow10"):
                    block[key] = {kind: values[:1]}
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.mark.parametrize("name", sorted(SHRINK))
def test_reproduction_miniature_runs_and_judges_its_claims(name, tmp_path):
    spec_path = tmp_path / f"{name}.yaml"
    spec_path.write_text(miniature(REPRO / f"{name}.yaml", name, tmp_path))
    pre = REPRO / "pre" / f"{name}.yaml"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "HPSWEEP_STORAGE": str(tmp_path / "storage")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hpsweep.cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)

    if pre.exists():  # stage 1 first, as make reproduce does
        pre_path = tmp_path / f"pre-{name}.yaml"
        pre_path.write_text(miniature(pre, name, tmp_path))
        stage1 = cli("run", str(pre_path), "--no-live")
        assert stage1.returncode == 0, stage1.stdout[-3000:] + stage1.stderr[-3000:]
        # stage 1's LSTMs are outputs of the test's own storage (HPSWEEP_STORAGE), one per seed
        assert len(list((tmp_path / "storage" / "outputs" / "models").glob("*seed*.pt"))) == 2
    run = cli("run", str(spec_path), "--no-live")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "report"
    report = cli("report", str(spec_path), "--out", str(out))
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]

    index_spec = importlib.util.spec_from_file_location("repro_index", ROOT / "docs" / "reproductions" / "index.py")
    index = importlib.util.module_from_spec(index_spec)
    index_spec.loader.exec_module(index)
    rows = index.parse_claims((out / "report.md").read_text(encoding="utf-8"))
    claims = yaml.safe_load(spec_path.read_text())["claims"]
    assert [r["claim"] for r in rows] == [c["id"] for c in claims]
    for r in rows:
        assert r["verdict"] in index.VERDICTS
        assert "n=0/" not in r["evidence"].split(" vs ")[0], r  # every side found finished runs

    # the index of a reports folder holding this one report: one row per claim, linked
    docs = tmp_path / "docs"
    (docs / name).mkdir(parents=True)
    (docs / name / "report.md").write_text((out / "report.md").read_text(encoding="utf-8"), encoding="utf-8")
    index.record_provenance(name, 12.0, out_root=docs)
    written = index.write_index(docs, readme=None)
    assert len(written) == len(claims)
    text = (docs / "README.md").read_text(encoding="utf-8")
    assert f"]({name}/report.md)" in text and index.names_code_version((docs / name / "report.md").read_text())
