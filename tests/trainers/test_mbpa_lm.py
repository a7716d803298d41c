"""MbPA language-model evaluation on the real Brown corpus (PTB format), and the data loaders."""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hpsweep.trainer.run import LocalRun
from trainers.mbpa.config import Config
from trainers.mbpa.data import load_corpus, load_mnist, read_idx, resolve_uri
from trainers.mbpa.lm import evaluate_with_memory
from trainers.mbpa.models import LSTMLM

DATA = Path(os.environ.get("HPSWEEP_SHARED_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def brown(tmp_path_factory):
    run = LocalRun(tmp_path_factory.mktemp("run"), device=CPU)
    return load_corpus(run, str(DATA / "brown"), "brown", train_tokens=1000, eval_tokens=700)


@pytest.fixture(scope="module")
def model(brown):
    torch.manual_seed(0)
    m = LSTMLM(brown.vocab_size, 16, 16, 1)
    # a model that has seen a little text, so the memory has something to add
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = brown.ids["train"][:1000].view(10, 100)
    for _ in range(5):
        logits, _ = m(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_corpus_is_ptb_format(brown):
    assert brown.vocab_size == 10001            # 10k words (with <unk>) plus <eos>
    assert "<unk>" in brown.index and "<eos>" in brown.index
    assert brown.ids["train"].shape == (1000,) and brown.ids["valid"].shape == (700,)
    first = (DATA / "brown" / "brown.train.txt").read_text().split("\n")[0].split()
    assert [brown.words[i] for i in brown.ids["train"][:len(first)]] == first
    assert brown.words[int(brown.ids["train"][len(first)])] == "<eos>"


def test_zero_lambdas_give_the_lstms_own_perplexity(brown, model):
    ids = brown.ids["valid"]
    cfg = Config(experiment="lm", lambda_cache=0.0, lambda_mbpa=0.0, lm_eval_chunk=50)
    mix, alone = evaluate_with_memory(model, ids, cfg)
    with torch.no_grad():                            # independent: the whole stream at once, float64
        logits, _ = model.double()(ids[None, :-1])
        model.float()
    ref = math.exp(float(F.cross_entropy(logits[0], ids[1:])))
    assert mix == alone
    assert mix == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("optimizer,steps", [("sgd", 1), ("sgd", 2), ("rmsprop", 1)])
def test_chunked_evaluation_is_exactly_sequential(brown, model, optimizer, steps):
    """Small chunks are (nearly) the plain online order; one big chunk must give the same perplexity."""
    ids = brown.ids["valid"][:41]
    cfg = Config(experiment="lm", memory_size=15, neighbours=8, lambda_cache=0.1, lambda_mbpa=0.2, alpha=0.5,
                 steps=steps, local_optimizer=optimizer, lm_eval_chunk=3, adapt_chunk=40)
    one = evaluate_with_memory(model, ids, cfg)
    many = evaluate_with_memory(model, ids, dataclasses.replace(cfg, lm_eval_chunk=40))
    assert many == pytest.approx(one, rel=1e-5)
    assert one[0] != pytest.approx(one[1], rel=1e-3)   # the memory changed the prediction


def test_memory_mixture_helps_on_real_text(brown, model):
    cfg = Config(experiment="lm", memory_size=500, neighbours=64, lm_eval_chunk=128)
    mix, alone = evaluate_with_memory(model, brown.ids["valid"][:400], cfg)
    assert mix < alone, (mix, alone)


def test_mnist_idx_gz_and_plain_and_relative_paths(tmp_path):
    run = LocalRun(tmp_path / "run", device=CPU)
    gz = load_mnist(run, str(DATA / "mnist"))
    assert gz["train_x"].shape == (60000, 784) and gz["test_y"].shape == (10000,)
    assert gz["train_x"].max() == 1.0 and set(gz["train_y"].unique().tolist()) == set(range(10))
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in (DATA / "mnist").glob("*.gz"):   # the test files unzipped, the train files as they are
        if f.name.startswith("t10k"):
            with gzip.open(f) as src, open(plain / f.name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            (plain / f.name).symlink_to(f.resolve())
    same = load_mnist(run, str(plain))
    assert all(torch.equal(gz[k], same[k]) for k in gz)
    assert read_idx(plain / "t10k-labels-idx1-ubyte").shape == (10000,)
    with pytest.raises(FileNotFoundError, match="MNIST IDX"):
        load_mnist(run, str(tmp_path / "run"))
    os.environ["MBPA_TEST_DIR"] = str(plain)
    try:
        assert resolve_uri("${MBPA_TEST_DIR}/x") == f"{plain}/x"
        assert resolve_uri("${MBPA_UNSET_VAR:-/a/b}") == "/a/b"
    finally:
        del os.environ["MBPA_TEST_DIR"]
    assert resolve_uri("s3://bucket/mnist/") == "s3://bucket/mnist/"


def test_chunks_longer_than_the_memory(brown, model):
    """A chunk larger than N overwrites the whole memory (and its kept softmaxes) at once."""
    ids = brown.ids["valid"][:61]
    cfg = Config(experiment="lm", memory_size=15, neighbours=8, lambda_cache=0.1, lambda_mbpa=0.2, alpha=0.5,
                 lm_eval_chunk=20)
    assert evaluate_with_memory(model, ids, cfg) == pytest.approx(
        evaluate_with_memory(model, ids, dataclasses.replace(cfg, lm_eval_chunk=3)), rel=1e-5)
