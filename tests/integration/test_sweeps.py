"""Every CPU-sized sweep shipped in sweeps/ runs end to end through the engine, unchanged.

The paper-sized files are only validated (tests/unit/test_cli.py); these are their small
twins, and the quickstart. Stage 1 of the MbPA language model runs before stage 2, which
reads the LSTM stage 1 wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hpsweep.spec.model import load_spec
from hpsweep.spec.plan import plan
from hpsweep.store.runs import load_sweep
from hpsweep.views.stats import completeness

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CPU_SWEEPS = ["quickstart.yaml", "snap.copy-cpu.yaml", "snap.charlm-cpu.yaml",
              "mbpa.permuted-mnist-cpu.yaml", "mbpa.incremental-cpu.yaml",
              "mbpa.lm-cpu-train.yaml", "mbpa.lm-cpu.yaml"]


def test_the_list_covers_every_cpu_sized_sweep() -> None:
    shipped = {p.name for p in (ROOT / "sweeps").glob("*.yaml")
               if "-cpu" in p.name or p.name == "quickstart.yaml"}
    assert shipped == set(CPU_SWEEPS)


@pytest.mark.parametrize("name", CPU_SWEEPS)
def test_cpu_sweep_runs_end_to_end(name: str, mlflow_server, local_ray, tmp_path_factory, monkeypatch) -> None:
    from hpsweep.run.engine import run_sweep

    monkeypatch.chdir(ROOT)  # tests/conftest.py points the data root at ../shared/data
    path = ROOT / "sweeps" / name
    spec = load_spec(path)
    # one storage for all: stage 2 of the LM reads the output stage 1 wrote there (outputs/)
    storage = tmp_path_factory.getbasetemp() / "storage"
    outcome = run_sweep(spec, path.read_text(), tracking_uri=mlflow_server.url,
                        storage_uri=str(storage), live=False)
    cells = plan(spec)
    assert outcome.exit_code == 0 and outcome.finished + outcome.skipped == len(cells), outcome
    runs = load_sweep(mlflow_server.url, spec.name)
    matrix = completeness(cells, runs)
    assert matrix.counts["done"] == len(cells), matrix.counts
    values = [r.metrics.get(spec.metric.name) for r in runs.cells.values()]
    assert all(v is not None for v in values), f"cells without {spec.metric.name}"
    if name == "mbpa.lm-cpu-train.yaml":
        assert (storage / "outputs" / "models" / "mbpa-lstm-brown-cpu.pt").is_file()
