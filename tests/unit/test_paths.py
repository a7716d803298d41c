"""Locations from sweep files: the trainer's Config declares which fields are data paths and
which are output names; relative data paths stay under the sweep file's directory or the data
root; outputs are names that only ``run`` places. Checked at ``hpsweep validate`` (exit 2,
FILE:LINE), by the standalone trainer, and by the local ``run`` (file outputs and directories)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpsweep.store.storage import open_storage
from hpsweep.trainer.config import DataPath, OutputName, path_fields
from hpsweep.trainer.data import PathEscape, check_location, check_output_name, locate

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_configs_declare_their_location_fields() -> None:
    from trainers.mbpa.config import Config as Mbpa
    from trainers.sleep.config import Config as Sleep
    from trainers.snap.config import Config as Snap

    assert path_fields(Snap) == {"data": DataPath}
    assert path_fields(Mbpa) == {"data_dir": DataPath, "lm_checkpoint": DataPath, "save_model_to": OutputName}
    assert path_fields(Sleep) == {}


def test_location_rules(tmp_path) -> None:
    sweep_dir, root = tmp_path / "sweeps", tmp_path / "data"
    (sweep_dir / "local").mkdir(parents=True)
    (root / "mnist").mkdir(parents=True)
    bases = [sweep_dir, root]
    for ok in ("/abs/anywhere", "s3://bucket/prefix/", "mnist", "local", "mnist/../mnist", "output:models/x.pt"):
        assert check_location(ok, bases, must_exist=False) is None, ok
    for bad in ("../../../etc/passwd", "..", "mnist/../../x", "output:../x.pt", "output:/abs.pt"):
        assert check_location(bad, bases, must_exist=False) is not None, bad
    assert "climbs out" in check_location("../../../etc/passwd", bases, must_exist=False)
    assert locate("local", bases) == str(sweep_dir / "local")       # the sweep's directory first
    assert locate("mnist", bases) == str(root / "mnist")            # then the data root
    assert locate("s3://b/k", bases) == "s3://b/k"
    with pytest.raises(PathEscape):
        locate("../../../etc/passwd", bases)
    with pytest.raises(FileNotFoundError, match="is not under"):
        locate("nowhere", bases)
    for ok in ("lstm.pt", "models/lstm-{seed}.pt", "a/b/c"):
        assert check_output_name(ok) is None, ok
    for bad in ("", "/tmp/x.pt", "../elsewhere/model.pt", "s3://b/k", "a/../../b", "C:/x", "~/x"):
        assert check_output_name(bad) is not None, bad


SWEEP = """name: paths
trainer: {trainer}
config:
{config}
metric: {{name: {metric}, mode: min}}
"""


def _sweep(tmp_path: Path, trainer: str, config: dict, metric: str = "valid/bpc") -> Path:
    lines = "\n".join(f"  {k}: {v}" for k, v in config.items())
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP.format(trainer=trainer, config=lines, metric=metric))
    return path


def test_validate_refuses_a_data_path_that_climbs_out(tmp_path) -> None:
    path = _sweep(tmp_path, "snap", {"task": "charlm", "data": "../../../etc/passwd"})
    got = _cli("hpsweep.cli", "validate", str(path), cwd=tmp_path)
    assert got.returncode == 2, got
    assert f"{path}:5: config.data: '../../../etc/passwd' climbs out" in got.stderr
    assert "absolute path or s3:// URI" in got.stderr and "Traceback" not in got.stderr


def test_validate_refuses_escapes_in_swept_values_and_output_paths(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("""name: paths
trainer: mbpa
config:
  experiment: lm
  train_only: true
  save_model_to: ../../elsewhere/model.pt
parameters:
  data_dir: {grid: [brown, ../../../etc]}
metric: {name: valid/ppl_lstm, mode: min}
""")
    got = _cli("hpsweep.cli", "validate", str(path), cwd=tmp_path)
    assert got.returncode == 2, got
    assert f"{path}:6: config.save_model_to: '../../elsewhere/model.pt': an output name may not" in got.stderr
    assert f"{path}:8: parameters.data_dir: '../../../etc' climbs out" in got.stderr
    assert "'brown'" not in got.stderr


def test_validate_accepts_absolute_s3_relative_and_output_locations(tmp_path) -> None:
    for data in ("/anywhere/the/user/says.txt", "s3://bucket/wiki/", "enwiki/sample.txt", "here/x.txt"):
        path = _sweep(tmp_path, "snap", {"task": "charlm", "data": data})
        got = _cli("hpsweep.cli", "validate", str(path), cwd=tmp_path)
        assert got.returncode == 0, (data, got.stderr)
    path = _sweep(tmp_path, "mbpa", {"experiment": "lm", "data_dir": "brown",
                                     "lm_checkpoint": "output:models/lstm-{seed}.pt"}, "valid/ppl")
    got = _cli("hpsweep.cli", "validate", str(path), cwd=tmp_path)
    assert got.returncode == 0, got.stderr


def test_the_standalone_trainer_refuses_escapes_before_running(tmp_path) -> None:
    got = _cli("trainers.snap", "task=charlm", "data=../../../etc/passwd", "--out", str(tmp_path / "o"),
               cwd=tmp_path)
    assert got.returncode == 2 and "data: '../../../etc/passwd' climbs out" in got.stderr, got
    got = _cli("trainers.mbpa", "experiment=lm", "data_dir=brown", "train_only=true",
               "save_model_to=../../elsewhere/model.pt", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert got.returncode == 2 and "save_model_to:" in got.stderr and "'..' parts" in got.stderr, got
    assert not (tmp_path / "o").exists()


def test_local_run_outputs_round_trip_files_and_directories(tmp_path) -> None:
    import torch

    from hpsweep.trainer.run import LocalRun

    run = LocalRun(tmp_path / "a", device=torch.device("cpu"), outputs_dir=tmp_path / "outputs")
    with run.output("models/m.pt") as path:
        path.write_bytes(b"weights")
    with run.output("tok") as path:
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "vocab.txt").write_text("a b")
    with pytest.raises(RuntimeError), run.output("broken.pt") as path:
        path.write_bytes(b"half")
        raise RuntimeError("the trainer failed mid-write")
    assert not (tmp_path / "outputs" / "broken.pt").exists()   # nothing stored from a failed block
    with pytest.raises(PathEscape):
        run.output("../escape.pt").__enter__()
    other = LocalRun(tmp_path / "b", device=torch.device("cpu"), outputs_dir=tmp_path / "outputs")
    assert other.data_path("output:models/m.pt").read_bytes() == b"weights"
    assert (other.data_path("output:tok") / "sub" / "vocab.txt").read_text() == "a b"
    assert (tmp_path / "a" / "artifacts" / "m.pt").read_bytes() == b"weights"
    with pytest.raises(FileNotFoundError, match="no output"):
        other.data_path("output:missing.pt")
    run.close()
    other.close()


def test_local_storage_keeps_outputs_storage_wide(tmp_path) -> None:
    storage = open_storage(str(tmp_path / "store"))
    (tmp_path / "dir" / "x").mkdir(parents=True)
    (tmp_path / "dir" / "x" / "f.txt").write_text("f")
    (tmp_path / "m.pt").write_bytes(b"m")
    storage.put_path(tmp_path / "m.pt", "outputs", "models", "m.pt")
    storage.put_path(tmp_path / "dir", "outputs", "tok")
    assert (tmp_path / "store" / "outputs" / "models" / "m.pt").read_bytes() == b"m"
    assert storage.get_path(tmp_path / "cache", "outputs", "tok") == tmp_path / "store" / "outputs" / "tok"
    assert (storage.get_path(tmp_path / "cache", "outputs", "tok") / "x" / "f.txt").read_text() == "f"
    assert storage.get_path(tmp_path / "cache", "outputs", "nothing") is None
