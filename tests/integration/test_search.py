"""Search algorithms, schedulers and retries, through the engine on in-process Ray."""

from __future__ import annotations

import secrets
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hpsweep.spec.model import load_spec_text

pytestmark = pytest.mark.slow


def run(tmp_path: Path, uri: str, body: str):
    from hpsweep.run.engine import run_sweep

    name = f"s-{secrets.token_hex(4)}"
    text = f"name: {name}\ntrainer: sleep\nmetric: {{name: loss, mode: min}}\n" + textwrap.dedent(body)
    spec = load_spec_text(text, "t.yaml")
    outcome = run_sweep(spec, text, tracking_uri=uri, storage_uri=str(tmp_path / "storage"), live=False)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`hpsweep.role` = 'cell'", max_results=1000)
    return outcome, runs, client


def test_random_search_runs_the_samples_asked(tmp_path, mlflow_server, local_ray) -> None:
    outcome, runs, _ = run(tmp_path, mlflow_server.url, """
        config: {reports: 1, sleep: 0.0}
        parameters:
          x: {uniform: [-1, 1]}
        search: {algorithm: random, samples: 5}
    """)
    assert outcome.exit_code == 0 and outcome.finished == 5
    assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.params["x"] for r in runs}) == 5


def test_optuna_runs_the_samples_asked_and_moves_toward_the_optimum(tmp_path, mlflow_server, local_ray) -> None:
    outcome, runs, _ = run(tmp_path, mlflow_server.url, """
        config: {reports: 1, sleep: 0.0}
        parameters:
          x: {uniform: [-4, 4]}
        search: {algorithm: optuna, samples: 16}
        max_concurrent: 2
    """)
    assert outcome.exit_code == 0 and outcome.finished == 16
    assert len(runs) == 16 and all(r.info.status == "FINISHED" for r in runs)
    best = min(abs(float(r.data.params["x"])) for r in runs)
    # 16 uniform draws on [-4, 4] land within 0.5 of 0 with probability 1 - (7/8)**16 = 0.88;
    # TPE after its 10 random start-up trials concentrates near the optimum.
    assert best < 0.5, sorted(float(r.data.params["x"]) for r in runs)


def test_asha_stops_poor_trials_early(tmp_path, mlflow_server, local_ray) -> None:
    outcome, runs, client = run(tmp_path, mlflow_server.url, """
        config: {reports: 9, sleep: 0.05}
        parameters:
          x: {grid: [0.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]}
        scheduler: {type: asha, max_t: 9, grace_period: 1, reduction_factor: 3}
        max_concurrent: 2
    """)
    assert outcome.exit_code == 0, outcome
    assert len(runs) == 9 and all(r.info.status == "FINISHED" for r in runs)
    steps = {float(r.data.params["x"]): len(client.get_metric_history(r.info.run_id, "loss")) for r in runs}
    early = [r for r in runs if r.data.tags.get("hpsweep.early_stopped") == "true"]
    assert steps[0.0] == 9, steps                      # the best trial runs to the end
    assert len(early) >= 3 and all(steps[float(r.data.params["x"])] < 9 for r in early), steps

    # the reads (the Python API, as `status` and `results`) show those cells as stopped, each
    # value with the step it comes from
    import hpsweep

    exp = client.get_experiment_by_name(runs[0].data.tags["hpsweep.sweep"])
    sweep_file = Path(client.download_artifacts(runs[0].data.tags["mlflow.parentRunId"], "sweep.yaml",
                                                str(tmp_path)))   # the file the sweep ran, as logged
    rows = {float(r["x"]): r for r in hpsweep.load(sweep_file, tracking_uri=mlflow_server.url).status_rows()}
    early_x = {float(r.data.params["x"]) for r in early}
    assert {x for x, r in rows.items() if r["state"] == "stopped"} == early_x, rows
    assert all(rows[x]["step"] == steps[x] for x in early_x), (rows, steps)
    assert exp.tags.get("mlflow.sharedViewState.hpsweep-cells")  # the UI's view of the cells


def test_a_failing_trial_is_retried_then_failed_and_the_sweep_goes_on(tmp_path, mlflow_server, local_ray) -> None:
    outcome, runs, client = run(tmp_path, mlflow_server.url, """
        config: {reports: 3, sleep: 0.0}
        parameters:
          x: {grid: [0.0, 1.0]}
        variants:
          - {fail_at: -1}
          - {fail_at: 1}
        retries: 2
    """)
    assert outcome.exit_code == 1 and outcome.failed == 2 and outcome.finished == 2
    by_fail = {}
    for r in runs:
        by_fail.setdefault(r.data.params["fail_at"], []).append(r)
    assert all(r.info.status == "FINISHED" for r in by_fail["-1"])
    for r in by_fail["1"]:  # one run per cell, attempted 1 + 2 retries, resumed from step 1
        assert r.info.status == "FAILED" and r.data.tags["hpsweep.attempts"] == "3"
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert steps == [1], steps


def test_optuna_with_asha_leaves_no_run_open(tmp_path, mlflow_server, local_ray) -> None:
    outcome, runs, _ = run(tmp_path, mlflow_server.url, """
        config: {reports: 6, sleep: 0.02}
        parameters:
          x: {uniform: [-4, 4]}
        search: {algorithm: optuna, samples: 8}
        scheduler: {type: asha, max_t: 6, grace_period: 1, reduction_factor: 2}
        max_concurrent: 2
    """)
    assert outcome.exit_code == 0 and outcome.finished == 8, outcome
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs), \
        [r.info.status for r in runs]
    assert any(r.data.tags.get("hpsweep.early_stopped") == "true" for r in runs)
