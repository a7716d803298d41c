"""The SnAp trainer against its contract: config checks, declared metrics, determinism, resume."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from hpsweep.trainer.cli import main
from hpsweep.trainer.registry import load_trainer
from hpsweep.trainer.run import LocalRun
from trainers.snap import Config, train
from trainers.snap.tasks import ByteCorpus, Curriculum, copy_batch, read_bytes

SHARED = Path(os.environ.get("HPSWEEP_SHARED_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
ENWIKI = SHARED / "enwiki" / "enwiki-sample.xml.bz2"

TINY_COPY = dict(task="copy", hidden=8, batch=4, steps=6, eval_every=3, lr=0.01, threads=1)
TINY_LM = dict(task="charlm", data=str(ENWIKI), hidden=8, batch=2, seq_len=12, window=5, steps=4,
               eval_every=2, eval_batches=1, threads=1)


class Interrupted(RuntimeError):
    pass


class DyingRun(LocalRun):
    """A LocalRun whose process "dies" right after the first checkpoint is written."""

    def report(self, step, **metrics):
        raise Interrupted(f"killed at step {step}")


def history(config: Config, out: Path) -> list[dict]:
    run = LocalRun(out, device=torch.device("cpu"))
    try:
        train(config, run)
    finally:
        run.close()
    return [{k: v for k, v in row.items() if k not in ("time", "perf/steps_per_sec")} for row in run.history]


@pytest.mark.parametrize("method", ["bptt", "snap1", "snap2", "rtrl", "uoro", "snap3"])
def test_every_method_reports_declared_metrics(method, tmp_path):
    info = load_trainer("snap")
    config = Config(method=method, **TINY_COPY)
    rows = history(config, tmp_path)
    assert [r["step"] for r in rows] == [3, 6]
    for row in rows:
        names = set(row) - {"step"}
        assert {"train/bpc", "valid/bpc", "curriculum/length"} <= names
        assert all(info.reports(n) for n in names), names
        assert all(torch.isfinite(torch.tensor(row[n])) for n in names)


@pytest.mark.parametrize("method,cell", [("bptt", "lstm"), ("uoro", "gru"), ("snap2", "gru")])
def test_resume_continues_like_an_uninterrupted_run(method, cell, tmp_path):
    config = Config(method=method, cell=cell, sparsity=0.5, **TINY_COPY)
    straight = history(config, tmp_path / "straight")
    dying = DyingRun(tmp_path / "resumed", device=torch.device("cpu"))
    with pytest.raises(Interrupted):
        train(config, dying)
    dying.close()
    resumed = history(config, tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [6]
    assert resumed[0] == straight[1]
    assert history(config, tmp_path / "again") == straight  # a fixed seed is deterministic
    assert history(dataclasses.replace(config, seed=1), tmp_path / "other") != straight


def test_charlm_on_enwiki_reads_bz2_and_reports_test(tmp_path):
    rows = history(Config(method="snap1", sparsity=0.75, **TINY_LM), tmp_path)
    assert [r["step"] for r in rows] == [2, 4]
    assert "test/bpc" not in rows[0] and "test/bpc" in rows[1]
    for row in rows:
        assert 0 < row["valid/bpc"] < 9  # near log2(256) = 8 bits untrained
    info = load_trainer("snap")
    assert all(info.reports(n) for n in rows[-1] if n != "step")


def test_charlm_resume(tmp_path):
    config = Config(method="bptt", **TINY_LM)
    straight = history(config, tmp_path / "a")
    with pytest.raises(Interrupted):
        train(config, DyingRun(tmp_path / "b", device=torch.device("cpu")))
    assert history(config, tmp_path / "b") == straight[1:]


def test_byte_corpus_splits_real_text():
    data = read_bytes(ENWIKI)
    assert data[:100].lstrip().startswith(b"<")  # decompressed XML, not bz2 bytes
    corpus = ByteCorpus(data, valid_fraction=0.05)
    sizes = {k: len(v) for k, v in corpus.splits.items()}
    assert sum(sizes.values()) == len(data)
    assert sizes["valid"] == sizes["test"] == int(len(data) * 0.05)
    crops = corpus.crops("train", 3, 10, torch.Generator().manual_seed(0))
    x, y = ByteCorpus.encode(crops, torch.float32)
    assert x.shape == (10, 3, 256) and torch.equal(x.argmax(-1)[1:], y[:-1])


def test_copy_batch_layout():
    x, y = copy_batch(3, 2, torch.Generator().manual_seed(0))
    assert x.shape == (7, 2, 3) and y.shape == (7, 2)
    assert torch.equal(y[4:], x[:3, :, :2].argmax(-1))  # recall the bits in order
    assert (y[:4] == -1).all() and (x[3, :, 2] == 1).all() and (x[4:] == 0).all()


def test_curriculum_grows_on_low_recent_loss():
    c = Curriculum(threshold=0.15, window=3, max_length=3)
    assert not c.update(0.1) and not c.update(0.1)
    assert c.update(0.1) and c.length == 2
    for _ in range(3):
        c.update(0.5)
    assert c.length == 2  # a high mean does not grow it
    for _ in range(10):
        c.update(0.0)
    assert c.length == 3  # capped at max_length


@pytest.mark.parametrize("values,message", [
    (dict(method="snap0"), "snapN"),
    (dict(sparsity=1.0), "sparsity must be in"),
    (dict(task="charlm"), "needs data="),
    (dict(task="copy", hidden=0), "hidden must be >= 1"),
    (dict(task="copy", method="bptt", update_every=4), "update_every applies"),
])
def test_config_refuses_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        Config(**values)


def test_cli_reports_bad_option(capsys, tmp_path):
    assert main("snap", Config, train, ["task=copy", "methd=bptt", "--out", str(tmp_path)]) == 2
    assert "did you mean 'method'" in capsys.readouterr().err


def test_byte_corpus_from_a_directory_of_splits(tmp_path):
    for split, text in (("train", b"abcdefgh" * 4), ("valid", b"0123456789"), ("test", b"xyzxyzxyz")):
        (tmp_path / f"wiki.{split}.raw").write_bytes(text)
    corpus = ByteCorpus.load(tmp_path, min_length=5)
    assert bytes(corpus.splits["valid"].tolist()) == b"0123456789"
    assert len(corpus.splits["train"]) == 32
    (tmp_path / "other.train.txt").write_bytes(b"more")
    with pytest.raises(ValueError, match="expected one file named like"):
        ByteCorpus.load(tmp_path)


def test_relative_data_path_resolves_under_the_data_root_not_elsewhere(tmp_path, monkeypatch):
    """Standalone, a relative data path resolves under the current directory or the data root
    and may not climb out: the trainer refuses ``../../../etc/passwd`` before reading it."""
    from hpsweep.trainer.data import PathEscape

    root = tmp_path / "root"
    (root / "enwiki").mkdir(parents=True)
    (root / "enwiki" / "tiny.txt").write_bytes(b"abcdefgh" * 400)
    monkeypatch.setenv("HPSWEEP_DATA_ROOT", str(root))
    monkeypatch.chdir(tmp_path / "root" / "enwiki")  # a trial directory somewhere else
    run = LocalRun(tmp_path / "out", device=torch.device("cpu"))
    assert run.data_path("enwiki/tiny.txt") == root / "enwiki" / "tiny.txt"   # the data root
    assert run.data_path("tiny.txt") == Path.cwd() / "tiny.txt"                 # the current directory
    with pytest.raises(PathEscape, match="climbs out"):
        train(Config(task="charlm", data="../../../etc/passwd", steps=1, hidden=4, seq_len=8), run)
    with pytest.raises(PathEscape, match="climbs out"):
        run.data_path("enwiki/../../secret.txt")
    with pytest.raises(FileNotFoundError, match="is not under"):
        run.data_path("no/such/file.txt")
    absolute = tmp_path / "root" / "enwiki" / "tiny.txt"
    assert run.data_path(str(absolute)) == absolute   # absolute: the user's choice
    run.close()

def test_online_updates_mid_sequence(tmp_path):
    """update_every < window: several parameter updates per sequence, influence carried over."""
    base = Config(method="snap1", **{**TINY_LM, "steps": 2, "eval_every": 2})
    once = history(base, tmp_path / "once")
    often = history(dataclasses.replace(base, update_every=3), tmp_path / "often")
    assert once[0]["train/bpc"] != often[0]["train/bpc"]  # the parameters moved within the crops
    assert 0 < often[0]["valid/bpc"] < 9
