"""Trainer data from an ``s3://`` prefix on the real S3 API (moto_server on loopback): an image
folder uploaded there loads exactly as the local copy does, through the trainers' data cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from trainers.common.run import LocalRun
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
