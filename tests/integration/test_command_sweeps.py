"""Command trainers swept for real: Ray, a real `mlflow server`, programs in temporary directories
outside the checkout (not importable from it), asserted on what MLflow and the storage hold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_engine import HPSWEEP, child_runs, cli_env, run_cli

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def project(tmp_path: Path, files: dict[str, str], sweep: str) -> Path:
    """A user's directory: their program(s) and the sweep file beside them."""
    root = tmp_path / "mylab"
    root.mkdir()
    assert not root.resolve().is_relative_to(REPO)
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
        (root / name).chmod(0o755)
    (root / "sweep.yaml").write_text(textwrap.dedent(sweep))
    return root / "sweep.yaml"


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def by_mode(uri: str, name: str) -> dict[str, object]:
    runs = child_runs(uri, name)
    out = {}
    for r in runs:
        out.setdefault(json.loads(r.data.tags["hpsweep.params"])["mode"], []).append(r)
    assert all(len(rs) == 1 for rs in out.values()), {k: len(v) for k, v in out.items()}
    return {k: v[0] for k, v in out.items()}


def steps(uri: str, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


TRAIN_PY = """\
    import argparse, sys
    p = argparse.ArgumentParser()
    for name in ("--lr", "--seed"):
        p.add_argument(name, type=float)
    p.add_argument("--mode")
    a = p.parse_args()
    for i in range(1, 21):
        print(f"warming up {i}")
    if a.mode == "quiet":
        print("done, but no loss printed")
        sys.exit(0)
    for step in range(1, 4):
        print(f"step {step}: loss={a.lr / step}", flush=True)
    if a.mode == "exit3":
        print("cuda error: out of memory (pretend)", file=sys.stderr)
        sys.exit(3)
"""


def test_a_python_script_swept_unmodified_with_its_failures(tmp_path, mlflow_server, moto_server) -> None:
    """One FINISHED run per good cell with every step once and its output kept; a program exiting
    3 fails its cell after its retry with its last lines shown once; one that never prints the
    metric fails at once (not retried); `status` shows each failed cell with its reason."""
    path = project(tmp_path, {"train.py": TRAIN_PY}, """\
        name: cmd-script
        trainer: command
        config:
          command: ["{python}", train.py]
          lr: 0.5
        parameters:
          mode: {grid: [ok, exit3, quiet]}
        seeds: 1
        retries: 1
        metric: {name: loss, mode: min}
    """)
    env = cli_env(tmp_path, moto_server)
    args = ["--tracking-uri", mlflow_server.url, "--storage", str(tmp_path / "storage")]
    proc = run_cli(["run", str(path), *args, "--no-live"], env, path.parent)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    runs = by_mode(mlflow_server.url, "cmd-script")
    ok, exit3, quiet = runs["ok"], runs["exit3"], runs["quiet"]
    assert ok.info.status == "FINISHED"
    assert steps(mlflow_server.url, ok.info.run_id, "loss") == [1, 2, 3]
    assert ok.data.metrics["loss"] == pytest.approx(0.5 / 3)
    assert "output.log" in {a.path for a in MlflowClient(mlflow_server.url).list_artifacts(ok.info.run_id)}
    assert exit3.info.status == "FAILED" and exit3.data.tags["hpsweep.attempts"] == "2"
    assert exit3.data.tags["hpsweep.error"].startswith("CommandFailed: command exited with status 3: ")
    assert quiet.info.status == "FAILED" and quiet.data.tags["hpsweep.attempts"] == "1"
    assert quiet.data.tags["hpsweep.error"].startswith("MetricNeverSeen: metric loss never seen")
    # the last lines, shown once in the run's summary of failures
    assert out.count("cuda error: out of memory (pretend)") == 1, out
    assert out.count("| done, but no loss printed") == 1, out
    # nothing the programs wrote landed in the user's directory
    assert sorted(p.name for p in path.parent.iterdir()) == [".hpsweep", "sweep.yaml", "train.py"] or \
        sorted(p.name for p in path.parent.iterdir()) == ["sweep.yaml", "train.py"]

    status = run_cli(["status", str(path), "--tracking-uri", mlflow_server.url], env, path.parent)
    text = status.stdout + status.stderr
    assert status.returncode == 0, text
    assert "done 1" in text and "failed 2" in text, text
    assert "mode=exit3 seed=0): CommandFailed: command exited with status 3" in text, text
    assert "mode=quiet seed=0): MetricNeverSeen: metric loss never seen" in text, text


def test_an_awk_program_with_a_pattern_of_its_own(tmp_path, mlflow_server, moto_server) -> None:
    path = project(tmp_path, {"fit.awk": """\
        #!/usr/bin/awk -f
        BEGIN { for (i = 1; i <= 5; i++) printf "iter %d | objective %.4f\\n", i * 100, rate * rate / i }
    """}, """\
        name: cmd-awk
        trainer: command
        config:
          command: [./fit.awk]
          args: ["-v", "rate={rate}"]
          metrics: ['iter (?P<step>\\d+) \\| objective (?P<objective>[0-9.]+)']
        parameters:
          rate: {grid: [1.0, 2.0]}
        metric: {name: objective, mode: min}
    """)
    env = cli_env(tmp_path, moto_server)
    proc = run_cli(["run", str(path), "--tracking-uri", mlflow_server.url, "--storage",
                    str(tmp_path / "storage"), "--no-live"], env, path.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = child_runs(mlflow_server.url, "cmd-awk")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        rate = json.loads(r.data.tags["hpsweep.params"])["rate"]
        history = sorted(MlflowClient(mlflow_server.url).get_metric_history(r.info.run_id, "objective"),
                         key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [
            (i * 100, pytest.approx(round(rate * rate / i, 4))) for i in range(1, 6)]


RESUMABLE = """\
    import argparse, json, os, time
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int)
    p.add_argument("--marker")
    a = p.parse_args()
    ckpt = os.path.join(os.environ["HPSWEEP_CHECKPOINT_DIR"], "state.json")
    resumed = os.environ.get("HPSWEEP_RESUME") == "1"
    start = json.load(open(ckpt))["step"] if resumed else 0
    with open(a.marker + ".starts", "a") as f:
        f.write(f"{start}\\n")
    for step in range(start + 1, 11):
        time.sleep(0.3)
        print(f"step={step} loss={1 / step}", flush=True)
        with open(ckpt + ".tmp", "w") as f:
            json.dump({"step": step}, f)
        os.replace(ckpt + ".tmp", ckpt)
        if step == 5 and not resumed:   # tell the test who runs it; it kills the worker
            with open(a.marker + ".tmp", "w") as f:
                f.write(f"{os.getppid()} {os.getpid()}")
            os.replace(a.marker + ".tmp", a.marker)
"""


def test_a_checkpoint_directory_resumes_after_its_worker_is_killed(tmp_path, mlflow_server, moto_server) -> None:
    marker = tmp_path / "who"
    path = project(tmp_path, {"loop.py": RESUMABLE}, f"""\
        name: cmd-resume
        trainer: command
        config:
          command: ["{{python}}", loop.py]
          marker: {str(marker)!r}
          grace: 2.0
        seeds: 1
        retries: 1
        checkpoint: {{every: 1}}
        metric: {{name: loss, mode: min}}
    """)
    env = cli_env(tmp_path, moto_server)
    env["HPSWEEP_LEASE_TTL"] = "6"   # the retried trial takes its cell over within seconds
    proc = subprocess.Popen([HPSWEEP, "run", str(path), "--tracking-uri", mlflow_server.url,
                             "--storage", str(tmp_path / "storage"), "--no-live"], env=env, cwd=path.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.stdout.read() if proc.poll() is not None else "no marker"
        worker, program = map(int, marker.read_text().split())
        os.kill(worker, signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert not alive(program), "the program outlived its killed worker"
    starts = [int(s) for s in Path(str(marker) + ".starts").read_text().split()]
    assert starts[0] == 0 and len(starts) == 2 and 1 <= starts[1] <= 5, starts
    (run,) = child_runs(mlflow_server.url, "cmd-resume")
    assert run.info.status == "FINISHED" and run.data.tags["hpsweep.attempts"] == "2"
    assert steps(mlflow_server.url, run.info.run_id, "loss") == list(range(1, 11))


def test_a_trainer_that_fails_before_training_ends_its_cells_at_once(tmp_path, mlflow_server, moto_server) -> None:
    """A trainer whose training module imports a missing package passes `validate` (only its
    config module is imported) and then fails every cell at once: not retried, each cell's run
    FAILED with the reason, shown by `run` and by `status`. (The trainer is a module on
    PYTHONPATH, named by its module path.)"""
    lib = tmp_path / "lib"
    (lib / "brokentrainer").mkdir(parents=True)
    (lib / "brokentrainer" / "__init__.py").write_text("")
    (lib / "brokentrainer" / "config.py").write_text(textwrap.dedent("""\
        import dataclasses
        METRICS = ("loss",)
        @dataclasses.dataclass(frozen=True)
        class Config:
            seed: int = 0
            x: float = 0.0
    """))
    (lib / "brokentrainer" / "training.py").write_text("import nosuchpackage_hpsweep_test\n")
    path = project(tmp_path, {}, """\
        name: broken-start
        trainer: brokentrainer
        parameters:
          x: {grid: [0.0, 1.0, 2.0]}
        seeds: 2
        retries: 3
        metric: {name: loss, mode: min}
    """)
    env = cli_env(tmp_path, moto_server)
    env["PYTHONPATH"] = os.pathsep.join([str(lib), env.get("PYTHONPATH", "")])
    args = ["--tracking-uri", mlflow_server.url, "--storage", str(tmp_path / "storage")]
    assert run_cli(["validate", str(path)], env, path.parent).returncode == 0
    started = time.monotonic()
    proc = run_cli(["run", str(path), *args, "--no-live"], env, path.parent)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    runs = child_runs(mlflow_server.url, "broken-start")
    assert len(runs) == 6, out
    for r in runs:
        assert r.info.status == "FAILED" and r.data.tags["hpsweep.attempts"] == "1"
        assert r.data.tags["hpsweep.error"] == "ModuleNotFoundError: No module named 'nosuchpackage_hpsweep_test'"
    assert "6 failed" in out and out.count("No module named 'nosuchpackage_hpsweep_test'") >= 1, out
    status = run_cli(["status", str(path), "--tracking-uri", mlflow_server.url], env, path.parent)
    text = status.stdout + status.stderr
    assert "failed 6" in text and "and 5 more: ModuleNotFoundError: No module named" in text, text
    print(f"6 cells failed in {time.monotonic() - started:.1f} s")
