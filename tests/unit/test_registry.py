"""Trainers from anywhere (issue 21): a file or package directory beside the sweep file, any
importable module, a name registered through the entry-point group ``hpsweep.trainers``; the
contract checked at ``hpsweep validate`` (exit 2, FILE:LINE, every problem at once, the user's
own file and line); the local runner; requirements; the scaffold; what submit ships.

Every trainer here is a user's: written into a temporary directory outside the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from hpsweep.spec.model import SpecError, load_spec
from hpsweep.trainer.registry import BUILTIN, GROUP, entry_points, load_trainer

REPO = Path(__file__).resolve().parents[2]

LOGREG = '''\
import dataclasses

METRICS = ("loss",)


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    lr: float = 0.1
    steps: int = 5


def train(config, run):
    state = run.load_checkpoint() or {"step": 0, "w": 0.0}
    w = state["w"]
    for step in range(state["step"], config.steps):
        w -= config.lr * 2 * (w - 3.0)
        run.save_checkpoint({"step": step + 1, "w": w})
        run.report(step + 1, loss=(w - 3.0) ** 2)
'''


def _sweep(directory: Path, trainer: str, name: str = "s", extra: str = "") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(f"name: {name}\ntrainer: {trainer}\nparameters:\n  lr: {{grid: [0.1, 0.2]}}\n"
                    f"metric: {{name: loss, mode: min}}\n{extra}")
    return path


HPSWEEP = str(Path(sys.executable).with_name("hpsweep"))


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `hpsweep` command as a user runs it (the current directory not on sys.path)."""
    return subprocess.run([HPSWEEP, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_builtin_fallback_is_pyprojects_entry_points():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][GROUP]
    assert declared == BUILTIN
    assert {k: v for k, v in entry_points().items() if k in BUILTIN} == BUILTIN


def test_a_file_a_package_and_a_module_beside_the_sweep(tmp_path, monkeypatch):
    (tmp_path / "logreg.py").write_text(LOGREG)
    spec = load_spec(_sweep(tmp_path, "./logreg.py"))
    info = load_trainer(spec.trainer, base_dir=spec.trainer_base())
    assert info.ref.kind == "file" and Path(info.ref.source) == tmp_path / "logreg.py"
    assert [f for f in info.Config.__dataclass_fields__] == ["seed", "lr", "steps"]

    # a package directory whose Config and METRICS live in a config submodule, train in training:
    # validating imports neither training nor what it imports
    pkg = tmp_path / "lab" / "mylab"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from mylab.config import Config, METRICS\n")
    (pkg / "config.py").write_text(LOGREG.split("\n\ndef train")[0] + "\n")
    (pkg / "training.py").write_text("import mylab_heavy_stack_marker\n" + LOGREG)
    spec = load_spec(_sweep(tmp_path / "lab", "./mylab/", "p"))
    assert "mylab_heavy_stack_marker" not in sys.modules and "mylab.training" not in sys.modules
    with pytest.raises(ModuleNotFoundError, match="No module named 'mylab_heavy_stack_marker'"):
        load_trainer(spec.trainer, base_dir=spec.trainer_base())   # what a trial does: train imported there

    # a module path, importable through sys.path (as PYTHONPATH makes it)
    site = tmp_path / "site"
    (site / "acme").mkdir(parents=True)
    (site / "acme" / "__init__.py").write_text("")
    (site / "acme" / "fit.py").write_text(LOGREG)
    monkeypatch.syspath_prepend(str(site))
    info = load_trainer("acme.fit")
    assert info.ref.kind == "module" and info.train.__module__ == "acme.fit"


BROKEN = {
    "raises.py": "import dataclasses\n\nx = 1\nraise RuntimeError('the lab server is down')\n",
    "syntax.py": "def train(config, run)\n    pass\n",
    "nothing.py": "x = 1\n",
    "loose.py": textwrap.dedent('''\
        import dataclasses
        METRICS = "loss"
        @dataclasses.dataclass
        class Config:
            lr: float = 0.1
        def train(config):
            pass
        '''),
    "noseed.py": textwrap.dedent('''\
        import dataclasses
        METRICS = ("loss",)
        @dataclasses.dataclass(frozen=True)
        class Config:
            lr: float = 0.1
        def train(config, run):
            pass
        '''),
}


def test_validate_names_every_bad_trainer_with_file_and_line(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "logreg.py").write_text(LOGREG)
    for name, text in BROKEN.items():
        (project / name).write_text(text)
    (project / "nopkg").mkdir()
    sweeps = [_sweep(project, f"./{name}", Path(name).stem) for name in BROKEN]
    sweeps += [_sweep(project, "./logreg2.py", "typo"), _sweep(project, "logreg", "bare"),
               _sweep(project, "slep", "builtin"), _sweep(project, "./nopkg/", "nopkg"),
               _sweep(project, "zzlab.fit", "nomod")]
    out = _cli("validate", *[s.name for s in sweeps], cwd=project)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == len(sweeps), out.stderr
    got = dict(line.split(": trainer: ", 1) for line in lines)
    here = str(project)
    assert got["raises.yaml:2"] == f"{here}/raises.py:4: RuntimeError: the lab server is down (importing raises)"
    assert got["syntax.yaml:2"].startswith(f"{here}/syntax.py:1: SyntaxError: expected ':'")
    assert got["nothing.yaml:2"] == (
        f"{here}/nothing.py: trainer './nothing.py': no Config: define a frozen dataclass `Config` whose "
        "fields are the options; no METRICS: a tuple of the metric names train reports, e.g. "
        "METRICS = (\"loss\", \"acc\"); no train function: define `def train(config, run):` (or a "
        "`training` submodule that does)")
    assert got["loose.yaml:2"] == (
        f"{here}/loose.py: trainer './loose.py': Config is not frozen: use @dataclasses.dataclass(frozen=True) "
        "(a cell's options never change while it trains); METRICS must be a tuple of metric names (strings), "
        "got 'loss'; train(config) (line 6) cannot be called as train(config, run); define "
        "`def train(config, run):`")
    assert got["noseed.yaml:2"].endswith("Config has no `seed` field: add `seed: int = 0` (each cell's seed "
                                         "arrives there)")
    assert got["typo.yaml:2"].startswith(f"./logreg2.py: no such file or directory (relative to {here}) "
                                         "(did you mean './logreg.py'?)")
    assert got["bare.yaml:2"].startswith("unknown trainer 'logreg' (did you mean './logreg.py'?); "
                                         "registered trainers: command, mbpa, sleep, snap")
    assert got["builtin.yaml:2"].startswith("unknown trainer 'slep' (did you mean 'sleep'?)")
    assert got["nopkg.yaml:2"].startswith("./nopkg/: a package directory needs an __init__.py")
    assert got["nomod.yaml:2"].startswith("unknown trainer 'zzlab.fit'; registered trainers:")


def test_a_file_named_like_an_imported_module_is_refused(tmp_path):
    (tmp_path / "json.py").write_text(LOGREG)
    with pytest.raises(SpecError, match=r"trainer: ./json.py: the module name 'json' is already taken by "
                                        r".*json/__init__.py; rename the file or directory"):
        load_spec(_sweep(tmp_path, "./json.py"))


def test_the_local_runner_runs_a_file_trainer_and_resumes(tmp_path):
    (tmp_path / "logreg.py").write_text(LOGREG)
    run = [sys.executable, "-m", "hpsweep.trainer", "./logreg.py", "lr=0.25", "--out", "out"]
    first = subprocess.run([*run, "steps=3"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([*run, "steps=6"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    w = 0.0   # an independent recomputation of the trainer's iterate
    for row in rows:
        w -= 0.25 * 2 * (w - 3.0)
        assert row["loss"] == pytest.approx((w - 3.0) ** 2)
    bad = subprocess.run([*run, "lrr=1"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "lrr: unknown option of logreg.Config (did you mean 'lr'?)" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "hpsweep.trainer", "./nope.py"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "./nope.py: no such file or directory" in missing.stderr


def test_requirements_checked_on_load_and_before_a_local_run(tmp_path):
    (tmp_path / "logreg.py").write_text(LOGREG)
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "labutil-0.3-py3-none-any.whl").write_bytes(b"")
    bad = _sweep(tmp_path, "./logreg.py", "bad",
                 'requirements: [./wheels/missing-1.0-py3-none-any.whl, "bad req !"]\n')
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    assert str(info.value).splitlines() == [
        f"{bad}:6: requirements: ./wheels/missing-1.0-py3-none-any.whl: no such file (relative to {tmp_path})",
        f"{bad}:6: requirements: 'bad req !' is not a requirement pip understands: Expected semicolon "
        "(after name with no version specifier) or end"]
    (tmp_path / "reqs.txt").write_text("# what the lab needs\npyyaml>=5\nnosuchpkg_21a>=1.0  # soon\n"
                                       "pyyaml<1\n./wheels/labutil-0.3-py3-none-any.whl\n")
    sweep = _sweep(tmp_path, "./logreg.py", "reqs", "requirements: reqs.txt\n")
    assert load_spec(sweep).requirements == "reqs.txt"
    out = _cli("run", sweep.name, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        f"{sweep.name}:6: requirements: not installed here: nosuchpkg_21a>=1.0 (not installed), pyyaml<1 "
        f"(pyyaml {_version('pyyaml')} is installed), ./wheels/labutil-0.3-py3-none-any.whl (not installed); "
        "install them (pip install ...) or run on a cluster with `hpsweep submit`, which installs them on "
        "its nodes")
    assert not (tmp_path / ".hpsweep").exists()   # nothing started, nothing written


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


def test_submit_ships_the_trainer_and_its_wheel_and_no_credentials(tmp_path):
    from hpsweep.cluster.jobs import build_submission

    project = tmp_path / "project"
    (project / "wheels").mkdir(parents=True)
    (project / "logreg.py").write_text(LOGREG)
    (project / "wheels" / "labutil-0.3-py3-none-any.whl").write_bytes(b"PK")
    (project / ".env").write_text("AWS_SECRET_ACCESS_KEY=x\n")
    (project / "notes.txt").write_text("not named by the sweep\n")
    sweep = _sweep(project, "./logreg.py", "ship",
                   "requirements: [./wheels/labutil-0.3-py3-none-any.whl, pyyaml>=5]\n")
    sub = build_submission(sweep, tracking_uri="http://mlflow:5000", storage="s3://b/p", working_dir=project)
    env = sub["runtime_env"]
    assert env["py_modules"] == [str(Path(env["working_dir"]) / "wheels" / "labutil-0.3-py3-none-any.whl")]
    assert env["pip"] == ["pyyaml>=5"]
    shipped = {p.relative_to(env["working_dir"]).as_posix() for p in Path(env["working_dir"]).rglob("*")
               if p.is_file() and p.relative_to(env["working_dir"]).parts[0] not in ("hpsweep", "trainers")}
    import shutil

    shutil.rmtree(env["working_dir"])   # what submit does once the job is sent
    assert shipped == {"ship.yaml", "logreg.py", "wheels/labutil-0.3-py3-none-any.whl"}
    outside = tmp_path / "elsewhere.py"
    outside.write_text(LOGREG)
    far = _sweep(project, "../elsewhere.py", "far")
    with pytest.raises(Exception, match=r"trainer ../elsewhere.py: .* is outside the working directory"):
        build_submission(far, tracking_uri="http://mlflow:5000", storage="s3://b/p", working_dir=project)


def test_the_scaffold_validates_and_its_test_passes(tmp_path):
    out = _cli("new", "trainer", "linefit", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linefit.py", "linefit.yaml", "test_linefit.py"]
    spec = load_spec(tmp_path / "linefit.yaml")
    assert spec.trainer == "./linefit.py" and spec.trainer_info().reports("loss")
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_linefit.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert test.returncode == 0, test.stdout + test.stderr
    again = _cli("new", "trainer", "linefit", cwd=tmp_path)
    assert again.returncode == 2 and "exists already" in again.stderr

    command = tmp_path / "cmd"
    command.mkdir()
    out = _cli("new", "trainer", "fitscript", "--command", cwd=command)
    assert out.returncode == 0, out.stderr
    import yaml

    sweep = yaml.safe_load((command / "fitscript.yaml").read_text())
    assert sweep["trainer"] == "command" and sweep["config"]["command"] == ["python3", "fitscript.py"]
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fitscript.py"],
                          cwd=command, capture_output=True, text=True, timeout=120)
    assert test.returncode == 0, test.stdout + test.stderr


def test_the_example_trainer_validates_and_learns(tmp_path):
    """examples/logreg: its sweep validates; the trainer alone, one epoch on 2,000 MNIST images,
    well above chance (softmax regression reaches about 0.9 on MNIST; chance is 0.1)."""
    data = Path(os.environ["HPSWEEP_DATA_ROOT"]) / "mnist"   # tests/conftest.py points it at ../shared/data
    example = REPO / "examples" / "logreg"
    spec = load_spec(example / "logreg.yaml")
    assert spec.trainer_info().reports(spec.metric.name)
    out = subprocess.run([sys.executable, "-m", "hpsweep.trainer", str(example / "logreg.py"), "epochs=1",
                          "train_size=2000", f"data_dir={data}", "--out", "out"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 1 and row["test/acc"] > 0.8 and row["valid/acc"] > 0.8


def test_render_rayjob_installs_named_requirements_and_refuses_code_it_cannot_carry(tmp_path):
    from hpsweep.cluster.render import rayjob_manifests
    from hpsweep.errors import UsageError

    (tmp_path / "logreg.py").write_text(LOGREG)
    with pytest.raises(UsageError, match=r"trainer ./logreg.py: a RayJob runs the code of its image"):
        rayjob_manifests(_sweep(tmp_path, "./logreg.py", "file"))
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "labfit.py").write_text(LOGREG)
    sys.path.insert(0, str(tmp_path / "lab"))
    try:
        _, job = rayjob_manifests(_sweep(tmp_path, "labfit", "module", "requirements: [scikit-learn>=1.4]\n"))
    finally:
        sys.path.remove(str(tmp_path / "lab"))
    import yaml

    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"pip": ["scikit-learn>=1.4"]}
    # a command trainer's directory is not in the image either
    (tmp_path / "cmd.yaml").write_text("name: cmd\ntrainer: command\nconfig: {command: [sh, train.sh]}\n"
                                       "parameters:\n  lr: {grid: [0.1, 0.2]}\nmetric: {name: loss, mode: min}\n")
    (tmp_path / "train.sh").write_text("echo loss=1\n")
    with pytest.raises(UsageError, match=r"a command trainer's directory: a RayJob runs the code of its image"):
        rayjob_manifests(tmp_path / "cmd.yaml")
