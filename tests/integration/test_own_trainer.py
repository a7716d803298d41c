"""A user's own trainer, as a user has it: in a directory outside the checkout (not importable
from it), swept by file path and by module path, interrupted with Ctrl-C and run again; an
installed plugin found through its entry point; the scaffold's output (a Python trainer, and a
script swept as ``trainer: command``) run as generated.

Real parts: `hpsweep run` processes (in-process Ray), a real `mlflow server`; the data
asserted is MLflow's (run statuses, metric histories, tags), never log lines.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

HPSWEEP = str(Path(sys.executable).with_name("hpsweep"))
REPO = Path(__file__).resolve().parents[2]

#: a trainer a user writes: no import from hpsweep; it reads a data file named relative to the
#: sweep file, sleeps a little per step, checkpoints every step, and notes each start (the step
#: it starts from) in a file of its own per cell, so that a test sees where an attempt resumed
SLOWFIT = '''\
import dataclasses
import os
import time

METRICS = ("loss", "target")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    lr: float = 0.1
    steps: int = 8
    sleep: float = 0.4
    data: str = "target.txt"
    starts: str = ""


def train(config, run):
    target = float(open(run.data_path(config.data)).read())
    state = run.load_checkpoint() or {"step": 0, "w": 0.0}
    if config.starts:
        with open(os.path.join(config.starts, f"lr={config.lr},seed={config.seed}"), "a") as f:
            f.write(f"{state['step']}\\n")
    w = state["w"]
    for step in range(state["step"], config.steps):
        time.sleep(config.sleep)
        w -= config.lr * 2 * (w - target)
        run.save_checkpoint({"step": step + 1, "w": w})
        run.report(step + 1, loss=(w - target) ** 2, target=target)
'''


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's shell: no data root set (relative data resolves beside the sweep file), a Ray
    temp dir and token of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("HPSWEEP_DATA_ROOT", "HPSWEEP_SHARED_DATA")}
    ray_tmp = Path("/tmp") / f"hpo{secrets.token_hex(3)}"  # Ray's socket paths must stay short
    ray_tmp.mkdir()
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_TMPDIR": str(ray_tmp), **extra})
    return env


def _git(project: Path) -> str:
    """Make ``project`` a git repository with one commit; its sha."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "lab code"]):
        subprocess.run([*git, *args], cwd=project, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, check=True, capture_output=True,
                          text=True).stdout.strip()


def _runs(uri: str, sweep: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(sweep)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`hpsweep.role` = 'cell'", max_results=1000)


@pytest.mark.parametrize("form", ["file", "module"])
def test_own_trainer_resumes_after_ctrl_c_every_step_once(form, tmp_path, mlflow_server):
    lab = tmp_path / "lab"                  # the user's project, outside the checkout
    package = lab / "labfit"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "slowfit.py").write_text(SLOWFIT)
    sweeps = lab / "sweeps"
    sweeps.mkdir()
    (sweeps / "target.txt").write_text("3.0\n")   # data beside the sweep file
    sha = _git(lab)
    starts = tmp_path / "starts"
    starts.mkdir()
    name = f"own-{form}-{secrets.token_hex(3)}"
    trainer = "../labfit/slowfit.py" if form == "file" else "labfit.slowfit"
    sweep = sweeps / f"{name}.yaml"
    sweep.write_text(textwrap.dedent(f"""\
        name: {name}
        trainer: {trainer}
        config: {{steps: 8, sleep: 0.4, starts: {starts}}}
        parameters:
          lr: {{grid: [0.1, 0.2, 0.3]}}
        metric: {{name: loss, mode: min}}
        resources: {{cpus: 1}}
        max_concurrent: 2
        bundle: 1
        """))
    # the module form finds the package through PYTHONPATH, as a user's shell would have it
    pythonpath = os.pathsep.join(filter(None, [str(lab) if form == "module" else "", os.environ.get("PYTHONPATH")]))
    env = _env(tmp_path, PYTHONPATH=pythonpath)
    cwd = tmp_path / "elsewhere"            # run from another directory than the sweep's
    cwd.mkdir()
    args = [HPSWEEP, "run", str(sweep), "--tracking-uri", mlflow_server.url,
            "--storage", str(tmp_path / "storage"), "--no-live"]
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(mlflow_server.url)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        running = [r for r in _runs(mlflow_server.url, name) if r.info.status == "RUNNING"
                   and len(client.get_metric_history(r.info.run_id, "loss")) >= 2]
        if running:
            break
        time.sleep(0.3)
    assert proc.poll() is None, "the sweep ended before it could be interrupted:\n" + proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out

    again = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr

    runs = _runs(mlflow_server.url, name)
    assert sorted(r.data.params["lr"] for r in runs) == ["0.1", "0.2", "0.3"]   # one run per cell
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        history = client.get_metric_history(r.info.run_id, "loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 9))  # each once
        w, lr = 0.0, float(r.data.params["lr"])   # the values: recomputed independently
        for m in sorted(history, key=lambda m: m.step):
            w -= lr * 2 * (w - 3.0)
            assert m.value == pytest.approx((w - 3.0) ** 2)
        assert r.data.tags["hpsweep.code_version"] == sha     # the trainer's own commit
        assert r.data.tags["hpsweep.version"]
    # some cell was interrupted mid-way and its second attempt started from its checkpoint
    begun = {p.name: [int(x) for x in p.read_text().split()] for p in starts.iterdir()}
    assert any(len(s) == 2 and s[1] > 0 for s in begun.values()), begun


def _plugin_wheel(tmp_path: Path) -> Path:
    """A distribution registering trainer ``linefit_demo`` in group hpsweep.trainers, built as
    a wheel here (no index needed)."""
    src = tmp_path / "plugin-src"
    (src / "hps_demo_plugin").mkdir(parents=True)
    (src / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "hps-demo-plugin"
        version = "0.4.0"

        [project.entry-points."hpsweep.trainers"]
        linefit_demo = "hps_demo_plugin"

        [tool.setuptools]
        packages = ["hps_demo_plugin"]
        """))
    (src / "hps_demo_plugin" / "__init__.py").write_text(SLOWFIT)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(dist), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("hps_demo_plugin-0.4.0-*.whl")
    return wheel


def test_a_plugin_installed_in_a_venv_is_found_through_its_entry_point(tmp_path, mlflow_server):
    wheel = _plugin_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # hpsweep and its dependencies come from this environment's site-packages (its .pth files
    # too: an editable install of hpsweep is one)
    Path(site, "outer.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    outside = subprocess.run([sys.executable, "-c", "import hps_demo_plugin"], capture_output=True)
    assert outside.returncode != 0   # installed in the venv only

    project = tmp_path / "project"
    project.mkdir()
    (project / "target.txt").write_text("2.0\n")
    name = f"plugin-{secrets.token_hex(3)}"
    (project / "s.yaml").write_text(textwrap.dedent(f"""\
        name: {name}
        trainer: linefit_demo
        config: {{steps: 3, sleep: 0.0}}
        parameters:
          lr: {{grid: [0.1, 0.25]}}
        metric: {{name: loss, mode: min}}
        """))
    env = _env(tmp_path)
    hpsweep = [str(python), "-c", "from hpsweep.cli import entry; entry()"]
    validate = subprocess.run([*hpsweep, "validate", "s.yaml"], cwd=project, env=env, capture_output=True,
                              text=True, timeout=120)
    assert validate.returncode == 0, validate.stderr
    assert f"ok: s.yaml: '{name}', trainer linefit_demo, 2 cells" in validate.stdout
    (project / "typo.yaml").write_text("name: t\ntrainer: linefit_dem\nmetric: {name: loss, mode: min}\n")
    typo = subprocess.run([*hpsweep, "validate", "typo.yaml"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=120)
    assert typo.returncode == 2 and "(did you mean 'linefit_demo'?)" in typo.stderr, typo.stderr

    ran = subprocess.run([*hpsweep, "run", "s.yaml", "--tracking-uri", mlflow_server.url, "--no-live"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    runs = _runs(mlflow_server.url, name)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    client = MlflowClient(mlflow_server.url)
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [1, 2, 3]
        assert r.data.tags["hpsweep.code_version"] == "hps-demo-plugin 0.4.0"   # not a git checkout


def test_the_scaffold_runs_as_generated(tmp_path, mlflow_server):
    env = _env(tmp_path)
    new = subprocess.run([HPSWEEP, "new", "trainer", "linefit"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert new.returncode == 0, new.stderr
    ran = subprocess.run([HPSWEEP, "run", "linefit.yaml", "--tracking-uri", mlflow_server.url, "--no-live"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    runs = _runs(mlflow_server.url, "linefit")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    client = MlflowClient(mlflow_server.url)
    for r in runs:
        losses = [m.value for m in sorted(client.get_metric_history(r.info.run_id, "loss"), key=lambda m: m.step)]
        assert len(losses) == 50 and losses[-1] < losses[0]


def test_the_command_scaffold_runs_as_generated(tmp_path, mlflow_server):
    """``hpsweep new trainer NAME --command``: an ordinary script and its ``trainer: command``
    sweep, run as written in a directory outside the checkout."""
    assert not tmp_path.resolve().is_relative_to(REPO)
    env = _env(tmp_path)
    new = subprocess.run([HPSWEEP, "new", "trainer", "fitscript", "--command"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert new.returncode == 0, new.stderr
    ran = subprocess.run([HPSWEEP, "run", "fitscript.yaml", "--tracking-uri", mlflow_server.url, "--no-live"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    runs = _runs(mlflow_server.url, "fitscript")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["hpsweep.cell_id"] for r in runs}) == 4        # one run per cell
    assert {(r.data.params["lr"], r.data.params["seed"]) for r in runs} == {
        (lr, seed) for lr in ("0.01", "0.1") for seed in ("0", "1")}
    client = MlflowClient(mlflow_server.url)
    for r in runs:
        history = sorted(client.get_metric_history(r.info.run_id, "loss"), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, 51))            # every step once
        assert history[-1].value < history[0].value
