"""Trainer data from an ``s3://`` prefix on the real S3 API (moto_server on loopback): an image
folder uploaded there loads exactly as the local copy does, through the trainers' data cache."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from hpsweep.trainer.run import LocalRun
from trainers.mbpa import Config
from trainers.mbpa.data import load_image_folder, load_images

sys.path.append(str(Path(__file__).resolve().parents[1] / "trainers"))
from test_mbpa_imagefolder import _write_folder  # noqa: E402

pytestmark = pytest.mark.slow


def test_image_folder_from_an_s3_prefix_loads_like_the_local_folder(moto_server, aws_env, tmp_path, monkeypatch):
    monkeypatch.setenv("HPSWEEP_DATA_CACHE", str(tmp_path / "decoded"))
    root = tmp_path / "digits"
    _write_folder(root)
    bucket = moto_server.create_bucket()
    s3 = moto_server.client()
    for f in root.rglob("*.png"):
        s3.upload_file(str(f), bucket, f"sets/digits/{f.relative_to(root)}")
    run = LocalRun(tmp_path / "run", device=torch.device("cpu"), data_cache=tmp_path / "s3cache")
    cfg = Config(experiment="incremental", data_format="image_folder", data_dir=f"s3://{bucket}/sets/digits")
    remote = load_images(run, cfg)
    local = load_image_folder(root)
    assert set(remote) == set(local) and all(torch.equal(remote[k], local[k]) for k in local)
    assert (tmp_path / "s3cache" / bucket / "sets" / "digits" / "train" / "0").is_dir()


def test_outputs_go_to_s3_storage_and_back_through_the_engines_run(moto_server, mlflow_server, aws_env,
                                                                   tmp_path, monkeypatch) -> None:
    """The engine's run on real S3 (moto_server) and a real MLflow server: ``run.output`` puts a
    file and a directory under the storage's ``outputs/`` and logs them as the cell run's
    artifacts; another sweep's run on the same storage reads them back as ``output:NAME``;
    a rewrite of the output (a rerun of stage 1) is fetched again, not served from the cache."""
    from mlflow import MlflowClient

    from hpsweep.run.cellrun import TrialRun
    from hpsweep.spec.plan import Cell
    from hpsweep.store.mlflow import SweepTracker
    from hpsweep.store.storage import open_storage
    from hpsweep.store.tracker import CellTracker

    monkeypatch.setenv("HPSWEEP_DATA_CACHE", str(tmp_path / "cache"))
    bucket = moto_server.create_bucket()
    storage = open_storage(f"s3://{bucket}/hp")

    def engine_run(sweep: str) -> TrialRun:
        tracker = SweepTracker(mlflow_server.url, sweep)
        parent = tracker.start("h", "name: x")
        cell = Cell("c" + sweep[-1], 0, 0, {}, {"seed": 0})
        cell_tracker = CellTracker(mlflow_server.url, tracker.experiment_id, parent, sweep, cell)
        return TrialRun(cell, storage, sweep, cell_tracker, 1, False, "m",
                        [str(tmp_path), str(tmp_path / "root")])

    stage1 = engine_run("stage-1")
    with stage1.output("models/lstm-0.pt") as path:
        torch.save({"w": torch.arange(3.0)}, path)
    with stage1.output("vocab") as path:
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "words.txt").write_text("a b c")
    stage1.tracker.finish("FINISHED")
    assert set(moto_server.keys(bucket, "hp/outputs/")) == {"hp/outputs/models/lstm-0.pt",
                                                           "hp/outputs/vocab/sub/words.txt"}
    artifacts = {a.path for a in MlflowClient(mlflow_server.url).list_artifacts(stage1.tracker.run_id)}
    assert {"lstm-0.pt", "vocab"} <= artifacts

    stage2 = engine_run("stage-2")   # another sweep, same storage
    local = stage2.data_path("output:models/lstm-0.pt")
    assert torch.equal(torch.load(local, weights_only=True)["w"], torch.arange(3.0))
    assert (stage2.data_path("output:vocab") / "sub" / "words.txt").read_text() == "a b c"
    time.sleep(1.1)   # a later modification time on S3
    with stage1.output("models/lstm-0.pt") as path:
        torch.save({"w": torch.arange(5.0)}, path)
    again = stage2.data_path("output:models/lstm-0.pt")
    assert again == local and torch.equal(torch.load(again, weights_only=True)["w"], torch.arange(5.0))
    with pytest.raises(FileNotFoundError, match="no output 'models/none.pt'"):
        stage2.data_path("output:models/none.pt")
    from hpsweep.trainer.data import PathEscape

    with pytest.raises(PathEscape):
        stage2.data_path("../../../etc/passwd")
    stage2.tracker.finish("FINISHED")
