"""What ``hpsweep submit`` ships for a command trainer (issue 21): the command's directory (the
sweep file's, or ``config.workdir``) whole, less environments, caches, results and symbolic
links; a credential file in it refuses the job (exit 2, FILE:LINE, the field, the file, the fix);
a directory outside the shipped root is refused. On a node, the job's copy is what the program
sees: an absolute ``workdir`` under the root the job was shipped from means the node's copy.

No cluster: ``build_submission`` builds the job (nothing is sent) and a node is simulated by the
staged copy moved elsewhere, the user's files deleted, and the variable submit sets."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpsweep.cluster.jobs import build_submission
from hpsweep.errors import CredentialRefused, UsageError
from hpsweep.trainer.data import SHIPPED_FROM

REPO = Path(__file__).resolve().parents[2]
HPSWEEP = str(Path(sys.executable).with_name("hpsweep"))

#: an unmodified program: reads its data by a relative path, imports a module beside it
PROGRAM = '''\
import argparse
import os

import helper

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float)
parser.add_argument("--seed", type=int)
args = parser.parse_args()
values = [float(v) for v in open("data/values.txt").read().split()]
print(f"source: {os.path.realpath('data/values.txt')}")
print(f"loss={helper.scale(sum(values)) * args.lr}")
'''


def _command_sweep(path: Path, workdir: str | None = None, **extra) -> Path:
    config = {"command": ["{python}", "train.py"], "metrics": ["loss=(?P<loss>[0-9.eE+-]+)"]}
    if workdir is not None:
        config["workdir"] = workdir
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": path.stem, "trainer": "command", "config": config,
                                    "parameters": {"lr": {"grid": [0.5, 1.0]}},
                                    "metric": {"name": "loss", "mode": "min"}, **extra}, sort_keys=False))
    return path


def _line(sweep: Path, key: str) -> int:
    return next(i for i, line in enumerate(sweep.read_text().splitlines(), 1) if line.lstrip().startswith(key))


def _program(directory: Path) -> Path:
    (directory / "data").mkdir(parents=True)
    (directory / "train.py").write_text(PROGRAM)
    (directory / "helper.py").write_text("def scale(x):\n    return 2 * x\n")
    (directory / "data" / "values.txt").write_text("1.5 2.5\n")
    return directory


def _shipped(sub: dict) -> set[str]:
    """The files of the staged working directory, less the packages (and the stage removed,
    as submit removes it once the job is sent)."""
    staged = Path(sub["runtime_env"]["working_dir"])
    try:
        return {p.relative_to(staged).as_posix() for p in staged.rglob("*")
                if not p.is_dir() and p.relative_to(staged).parts[0] not in ("hpsweep", "trainers")}
    finally:
        shutil.rmtree(staged)


def _submit(sweep: Path, root: Path, **kw) -> dict:
    return build_submission(sweep, tracking_uri="http://mlflow:5000", storage="s3://b/p", working_dir=root, **kw)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    d = tmp_path / "project"
    d.mkdir()
    assert not d.resolve().is_relative_to(REPO)
    return d


def test_the_sweep_files_directory_is_shipped_whole_less_what_ray_leaves_out(project, capsys):
    sweeps = _program(project / "sweeps")
    sweep = _command_sweep(sweeps / "cmd.yaml")
    for name in (".git/HEAD", ".venv/bin/python", "runs/old.log", "__pycache__/helper.cpython-311.pyc",
                 "build/x.o", "lab.egg-info/PKG-INFO", ".hpsweep/mlflow.db", "data/nested/deep.txt",
                 ".hidden/notes.txt"):
        (sweeps / name).parent.mkdir(parents=True, exist_ok=True)
        (sweeps / name).write_text("x")
    (sweeps / "big").symlink_to(project)                       # a link: not followed, not shipped
    (project / "other").mkdir()
    (project / "other" / "unrelated.txt").write_text("not the command's")
    sub = _submit(sweep, project)
    assert sub["runtime_env"]["env_vars"][SHIPPED_FROM] == str(project.resolve())
    assert _shipped(sub) == {"sweeps/cmd.yaml", "sweeps/train.py", "sweeps/helper.py", "sweeps/data/values.txt",
                             "sweeps/data/nested/deep.txt", "sweeps/.hidden/notes.txt"}
    assert "left out of the job (symbolic links are not shipped): sweeps/big" in capsys.readouterr().err


def test_a_workdir_outside_the_sweeps_directory_is_shipped_at_its_place(project):
    code = _program(project / "code")
    sweep = _command_sweep(project / "sweeps" / "cmd.yaml", workdir=str(code))
    (project / "sweeps" / "notes.txt").write_text("beside the sweep, not the command's directory")
    assert _shipped(_submit(sweep, project)) == {"sweeps/cmd.yaml", "code/train.py", "code/helper.py",
                                                 "code/data/values.txt"}


def test_every_swept_workdir_is_shipped(project):
    first, second = _program(project / "v1"), _program(project / "v2")
    sweep = _command_sweep(project / "sweeps" / "cmd.yaml",
                           parameters={"lr": {"grid": [0.5]}, "workdir": {"grid": [str(first), str(second)]}})
    assert {p.split("/")[0] for p in _shipped(_submit(sweep, project))} == {"sweeps", "v1", "v2"}


def test_a_workdir_outside_the_shipped_root_is_refused(project, tmp_path):
    code = _program(tmp_path / "elsewhere")
    sweep = _command_sweep(project / "cmd.yaml", workdir=str(code))
    with pytest.raises(UsageError) as info:
        _submit(sweep, project)
    assert str(info.value) == (
        f"{sweep}:{_line(sweep, 'workdir:')}: config.workdir {str(code)!r}: {code.resolve()} is outside the working directory "
        f"{project.resolve()} that is shipped to the cluster; move it inside, or pass --working-dir a "
        "directory that holds both it and the sweep file")
    assert not [p for p in Path("/tmp").glob("hpsweep-job-*") if p.stat().st_mtime > sweep.stat().st_mtime]


@pytest.mark.parametrize("planted", [".env", "data/id_rsa", ".aws/credentials", "keys/prod.pem", "secrets.json"])
def test_a_credential_file_in_the_commands_directory_refuses_the_job(project, planted):
    _program(project)
    (project / planted).parent.mkdir(parents=True, exist_ok=True)
    (project / planted).write_text("AWS_SECRET_ACCESS_KEY=hunter2\n")
    sweep = _command_sweep(project / "cmd.yaml")
    with pytest.raises(CredentialRefused) as info:
        _submit(sweep, project)
    shown = planted.split("/")[0] if planted.startswith(".aws") else planted
    assert str(info.value).startswith(f"{sweep}:{_line(sweep, 'trainer:')}: trainer '.' (the sweep file's directory): {shown}: looks like "
                                      "a credentials file, and submit ships the command's directory")
    assert "Move it out of that directory" in str(info.value) and "hunter2" not in str(info.value)


def test_the_refusal_through_the_cli_exit_2_file_line_field_and_fix(project, tmp_path):
    code = _program(project / "code")
    (code / "data" / ".netrc").write_text("machine m login u password p\n")
    sweep = _command_sweep(project / "sweeps" / "cmd.yaml", workdir=str(code))
    out = subprocess.run([HPSWEEP, "submit", "sweeps/cmd.yaml", "--address", "http://127.0.0.1:9",
                          "--tracking-uri", "http://mlflow:5000", "--storage", "s3://b/p"],
                         cwd=project, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == (
        f"sweeps/cmd.yaml:{_line(sweep, 'workdir:')}: config.workdir {str(code)!r}: code/data/.netrc: looks like a credentials file, and "
        f"submit ships the command's directory {code.resolve()} whole: credentials never travel with a job. "
        "Move it out of that directory (or point config.workdir at a directory that holds only the program "
        "and its files), and give the nodes their credentials through their environment")


def test_image_jobs_refuse_a_command_trainer(project):
    _program(project)
    with pytest.raises(UsageError, match="a command's directory"):
        build_submission(_command_sweep(project / "cmd.yaml"), image="lab/trainer:1")


def test_on_a_node_the_program_runs_from_the_shipped_copy(project, tmp_path, monkeypatch):
    """The node: the staged copy elsewhere, the user's files gone, the job's variable set; the
    job's driver validates the sweep there and a cell's program reads the copy's files."""
    from hpsweep.run.engine import _bases
    from hpsweep.spec.model import load_spec
    from hpsweep.spec.plan import plan
    from hpsweep.trainer.command.training import train
    from hpsweep.trainer.config import build_config
    from hpsweep.trainer.registry import base_here
    from hpsweep.trainer.run import LocalRun

    code = _program(project / "code")
    sweep = _command_sweep(project / "sweeps" / "cmd.yaml", workdir=str(code))
    sub = _submit(sweep, project)
    node = tmp_path / "node-copy"
    shutil.move(sub["runtime_env"]["working_dir"], node)
    shutil.rmtree(project)
    for name, value in sub["runtime_env"]["env_vars"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(node)
    spec = load_spec(Path("sweeps/cmd.yaml"))        # the job's `hpsweep run`: the workdir is found here
    bases = _bases(spec.data_bases())
    assert bases[0] == "sweeps"                      # each node resolves it in its own copy
    assert base_here((str(tmp_path / "head-copy" / "sweeps"), "sweeps")) == str(node / "sweeps")
    (cell, *_) = plan(spec)
    config, problems = build_config(spec.trainer_info().Config, cell.config)
    assert not problems and config.workdir == str(code)   # the cell (and its id) as on the user's machine
    run = LocalRun(tmp_path / "out", bases=[Path(b) for b in bases])
    run.metric = "loss"
    train(config, run)
    run.close()
    assert run.history and run.history[-1]["loss"] == pytest.approx(2 * 4.0 * cell.config["lr"])
    log = (tmp_path / "out" / "artifacts" / "output.log").read_text()
    assert f"source: {node / 'code' / 'data' / 'values.txt'}" in log, log


def test_no_variable_no_relocation(tmp_path, monkeypatch):
    from hpsweep.trainer.data import relocate

    monkeypatch.delenv(SHIPPED_FROM, raising=False)
    monkeypatch.chdir(tmp_path)
    assert relocate("/lab/code") == "/lab/code"
    monkeypatch.setenv(SHIPPED_FROM, "/lab")
    assert relocate("/lab/code/x") == str(tmp_path / "code" / "x")
    assert relocate("/lab") == str(tmp_path)
    assert relocate("/laboratory/x") == "/laboratory/x" and relocate("rel/x") == "rel/x"
