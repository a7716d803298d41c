"""Bad locations are refused before anything starts (issue 14, items 10, 11, 13): exit 2, one
message saying what is wrong and what to give instead, no MLflow run, no Ray."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hpsweep.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOOD = "name: t\ntrainer: sleep\nmetric: {name: loss, mode: min}\nparameters:\n  x: {grid: [0.0, 1.0]}\n"


def _ray_started() -> bool:
    return "ray.tune" in sys.modules or "hpsweep.run.engine" in sys.modules


@pytest.fixture
def sweep(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "HPSWEEP_STORAGE", "HPSWEEP_RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    return path


def _refused(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    if "ray.tune" not in sys.modules:  # another test in this process may have imported it
        assert not _ray_started()
    return err


# --- 11: tracking URIs and storage MLflow or hpsweep cannot use ---------------------------

@pytest.mark.parametrize("uri, expected", [
    ("nonsense://x", "unknown scheme 'nonsense'; give an MLflow server (http://HOST:5000)"),
    ("file://", "MLflow's file store is not supported"),
    ("file:///tmp/somewhere", "MLflow's file store is not supported"),
    ("mlruns", "MLflow's file store is not supported"),
    ("sqlite://", "an in-memory or hostless SQLite URI keeps nothing; give sqlite:///PATH/mlflow.db"),
    ("sqlite:////nonexistent-hps-dir/x.db", "directory /nonexistent-hps-dir does not exist; create it first"),
])
def test_unusable_tracking_uris(sweep, capsys, uri, expected) -> None:
    _refused(capsys, ["run", str(sweep), "--tracking-uri", uri], f"--tracking-uri {uri}", expected)
    assert not Path("/nonexistent-hps-dir").exists(), "a directory was made at /"
    assert not (sweep.parent / ".hpsweep").exists()


def test_database_uri_without_its_driver(sweep, capsys) -> None:
    import importlib.util

    assert importlib.util.find_spec("psycopg") is None, "psycopg is installed: pick another driver"
    err = _refused(capsys, ["run", str(sweep), "--tracking-uri", "postgresql://me:pw@127.0.0.1:5432/mlflow"],
                   "--tracking-uri postgresql://127.0.0.1:5432/mlflow: MLflow needs the Python module "
                   "'psycopg' for postgresql:// (pip install psycopg[binary])")
    assert "pw" not in err


@pytest.mark.parametrize("where, expected", [
    ("/proc/hpsweep-storage", "cannot write to /proc/hpsweep-storage"),
    ("FILE/sub", "is a file, not a directory; give a writable directory or s3://BUCKET/PREFIX"),
])
def test_storage_that_cannot_be_written(sweep, capsys, where, expected) -> None:
    (sweep.parent / "FILE").write_text("")
    db = sweep.parent / "m.db"
    where = where.replace("FILE", str(sweep.parent / "FILE"))
    _refused(capsys, ["run", str(sweep), "--storage", where, "--tracking-uri", f"sqlite:///{db}"],
             f"--storage {where}", expected)
    assert not db.exists(), "an MLflow store was created for a refused run"
    assert not Path(where).exists()


# --- 10: data that does not exist, found before launching ---------------------------------

def test_missing_local_data_refused_before_launch(sweep, capsys) -> None:
    text = (ROOT / "sweeps" / "snap.charlm-cpu.yaml").read_text()
    assert "data: enwiki/enwiki-sample.xml.bz2" in text
    bad = sweep.parent / "snap.yaml"
    bad.write_text(text.replace("enwiki/enwiki-sample.xml.bz2", "no/such/corpus.bz2"))
    db = sweep.parent / "m.db"
    _refused(capsys, ["run", str(bad), "--tracking-uri", f"sqlite:///{db}"],
             f"{bad}: config.data: 'no/such/corpus.bz2' is not under {bad.parent}")
    assert not db.exists()


def test_missing_s3_data_refused_before_launch(sweep, capsys, monkeypatch) -> None:
    # an endpoint nothing answers on: the check must fail fast with a message, not a traceback
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    text = (ROOT / "sweeps" / "snap.charlm-cpu.yaml").read_text()
    bad = sweep.parent / "snap.yaml"
    bad.write_text(text.replace("enwiki/enwiki-sample.xml.bz2", "s3://nobucket/corpus.bz2"))
    _refused(capsys, ["run", str(bad), "--tracking-uri", f"sqlite:///{sweep.parent / 'm.db'}"],
             f"{bad}: config.data: s3://nobucket/corpus.bz2:")


# --- 13: a cluster's runs and checkpoints on a disk that is lost --------------------------

@pytest.mark.parametrize("flags, expected", [
    (["--tracking-uri", "sqlite:///mlflow.db"], "pass --tracking-uri http://MLFLOW-SERVER:5000"),
    (["--tracking-uri", "http://mlflow:5000", "--storage", "ckpt"], "pass --storage s3://BUCKET/PREFIX"),
])
def test_submit_refuses_local_stores(sweep, capsys, flags, expected) -> None:
    # refused before any connection: the address is one nothing answers on
    _refused(capsys, ["submit", str(sweep), "--address", "http://127.0.0.1:9", *flags],
             "a sweep on a cluster must keep its runs and checkpoints where every node", expected,
             "--allow-local-store")


def test_run_in_a_ray_job_directory_refuses_local_stores(tmp_path, capsys, monkeypatch) -> None:
    """What a job submitted without flags runs, on nodes without MLFLOW_TRACKING_URI."""
    job_dir = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    job_dir.mkdir(parents=True)
    (job_dir / "good.yaml").write_text(GOOD)
    monkeypatch.chdir(job_dir)
    for key in ("MLFLOW_TRACKING_URI", "HPSWEEP_STORAGE"):
        monkeypatch.delenv(key, raising=False)
    _refused(capsys, ["run", "good.yaml", "--address", "auto"],
             "Ray's temporary copy of the working directory",
             f"the runs would go to {job_dir / '.hpsweep' / 'mlflow.db'}",
             "pass --tracking-uri http://MLFLOW-SERVER:5000", "pass --storage s3://BUCKET/PREFIX")
    assert not (job_dir / ".hpsweep" / "mlflow.db").exists()
