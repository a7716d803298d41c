"""The language-model experiment: an LSTM trained with Adam, evaluated with a memory.

Evaluation runs over the valid/test stream in order. At position t the memory holds the
(hidden state, next word) pairs of the previous N positions; the prediction for x_{t+1} mixes
the LSTM, the neural cache and MbPA (softmax layer adapted on the K nearest memories). Positions
are processed ``lm_eval_chunk`` at a time, yet exactly as if one by one: the candidates of a
chunk are the memory plus the chunk itself, and each query sees only the candidates whose
position p satisfies t - N <= p < t.

Two stages, for a grid over evaluation options that must not retrain per cell: a run with
``train_only=true save_model_to=NAME`` trains the LSTM and writes a model file through
``run.output(NAME)`` (the sweep's storage, also logged as an artifact); runs with
``lm_checkpoint=output:NAME`` (or any data location) load it and only evaluate. A run with
neither trains and evaluates in one go. ``{seed}`` in either stands for the run's seed, so that
a stage-1 sweep over seeds writes one LSTM per seed and stage 2 replicates over those models.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from hpsweep.trainer.checkpoint import safe_load
from hpsweep.trainer.seeding import rng_state, seed_everything, set_rng_state
from trainers.mbpa.config import Config
from trainers.mbpa.data import Corpus, load_corpus
from trainers.mbpa.lm_adapt import cache_probs, mixture_log_probs, softmax_explicit, softmax_sgd_correction
from trainers.mbpa.memory import EpisodicMemory, kernel_weights, knn
from trainers.mbpa.models import LSTMLM

__all__ = ["train_lm", "evaluate_lstm", "evaluate_with_memory", "save_model", "load_model"]

#: largest N x V softmax table kept beside the LM memory (elements; 2^28 floats = 1 GiB)
MAX_PROB_CACHE = 1 << 28


def batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """(tokens,) -> (batch, tokens // batch): ``batch`` contiguous streams."""
    n = ids.shape[0] // batch
    return ids[:n * batch].view(batch, n)


@torch.no_grad()
def evaluate_lstm(model: LSTMLM, ids: torch.Tensor, batch: int = 10, bptt: int = 70) -> float:
    """Perplexity of the LSTM alone (no memory), in ``batch`` parallel streams."""
    model.eval()
    data = batchify(ids, batch)
    nll, count, state = 0.0, 0, None
    for i in range(0, data.shape[1] - 1, bptt):
        x, y = data[:, i:i + bptt], data[:, i + 1:i + 1 + bptt]
        x = x[:, :y.shape[1]]
        logits, state = model(x, state)
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
    model.train()
    return math.exp(nll / max(1, count))


@torch.no_grad()
def evaluate_with_memory(model: LSTMLM, ids: torch.Tensor, cfg: Config) -> tuple[float, float]:
    """(perplexity of the mixture, perplexity of the LSTM alone) over one stream, in order."""
    model.eval()
    device = ids.device
    W, b = model.decoder.weight, model.decoder.bias
    memory = EpisodicMemory(cfg.memory_size, W.shape[1], device)
    use_memory = cfg.lambda_cache > 0 or cfg.lambda_mbpa > 0
    # With T = 1 SGD the correction needs each neighbour's unadapted softmax, which is the
    # LSTM's own prediction at that position: keep them rather than recomputing them for every
    # batch of queries, in a ring indexed by position modulo N + chunk. A chunk's queries look
    # back at most N positions, so the chunk's own softmaxes can go in before its correction
    # without overwriting any that it still reads.
    ring = cfg.memory_size + cfg.lm_eval_chunk
    keep_probs = (cfg.lambda_mbpa > 0 and cfg.local_optimizer == "sgd" and cfg.steps == 1
                  and ring * W.shape[0] <= MAX_PROB_CACHE)
    mem_probs = torch.zeros(ring, W.shape[0], device=device) if keep_probs else None
    inputs, targets = ids[:-1], ids[1:]
    nll_mix, nll_lstm, state = 0.0, 0.0, None
    for start in range(0, inputs.shape[0], cfg.lm_eval_chunk):
        x = inputs[start:start + cfg.lm_eval_chunk]
        y = targets[start:start + cfg.lm_eval_chunk]
        h, state = model.hidden_states(x[None], state)
        h = h[0]
        logits = model.decoder(h)
        log_lstm = torch.log_softmax(logits, dim=-1)
        nll_lstm -= float(log_lstm.gather(1, y[:, None]).sum())
        if not use_memory:
            nll_mix -= float(log_lstm.gather(1, y[:, None]).sum())
            continue
        t = start + torch.arange(x.shape[0], device=device)
        if mem_probs is not None:
            mem_probs[t % ring] = log_lstm.exp()
        mk, mv, mp = memory.contents()
        cand_h, cand_y, cand_p = torch.cat([mk, h]), torch.cat([mv, y]), torch.cat([mp, t])
        valid = (cand_p[None, :] < t[:, None]) & (cand_p[None, :] >= t[:, None] - cfg.memory_size)
        has = valid.any(1)
        cache = mbpa = None
        if cfg.lambda_cache > 0:
            cache = cache_probs(h, cand_h, cand_y, valid, cfg.cache_theta, W.shape[0])
        if cfg.lambda_mbpa > 0:
            d2, idx = knn(h, cand_h, cfg.neighbours, valid)
            w = kernel_weights(d2, cfg.kernel_eps, cfg.normalise_weights)
            nb_y = cand_y.index_select(0, idx.reshape(-1)).view_as(idx)
            # one SGD step takes the dots from the distances: no (B, K, H) gather of keys
            fast = cfg.local_optimizer == "sgd" and cfg.steps == 1
            nb_h = None if fast else cand_h.index_select(0, idx.reshape(-1)).view(*idx.shape, -1)
            if cfg.local_optimizer == "sgd":
                table = (mem_probs, cand_p % ring) if mem_probs is not None else None
                mbpa = softmax_sgd_correction(W, b, h, nb_h, nb_y, w, steps=cfg.steps, lr=cfg.alpha,
                                              beta=cfg.beta, nb_idx=idx, cand_h=cand_h, probs_table=table,
                                              nb_d2=d2, base=logits)
            else:
                mbpa = softmax_explicit(W, b, h, nb_h, nb_y, w, steps=cfg.steps, lr=cfg.alpha, beta=cfg.beta,
                                        optimizer="rmsprop", decay=cfg.rmsprop_decay, eps=cfg.rmsprop_eps,
                                        chunk=cfg.adapt_chunk)
        logp = mixture_log_probs(logits, cache, mbpa, cfg.lambda_cache, cfg.lambda_mbpa, has)
        nll_mix -= float(logp.gather(1, y[:, None]).sum())
        memory.write(h, y)
    model.train()
    n = max(1, targets.shape[0])
    return math.exp(nll_mix / n), math.exp(nll_lstm / n)


def seeded(text: str, cfg: Config) -> str:
    """``text`` with ``{seed}`` replaced by the run's seed (one model file per seed)."""
    return text.replace("{seed}", str(cfg.seed))


def save_model(run, model: LSTMLM, corpus: Corpus, cfg: Config, name: str) -> None:
    """Write the model file (weights, sizes, vocabulary) as the run's output ``name``."""
    blob = {"state_dict": model.state_dict(), "words": corpus.words,
            "sizes": {"embed": cfg.lm_embed, "hidden": cfg.lm_hidden, "layers": cfg.lm_layers}}
    with run.output(name) as path:
        torch.save(blob, path)


def load_model(run, uri: str, corpus: Corpus, device: torch.device) -> LSTMLM:
    """Load a model file written by :func:`save_model`; its vocabulary must match the corpus."""
    path = Path(run.data_path(uri))
    blob = safe_load(path, device, what=f"lm_checkpoint {uri!r}")
    if blob["words"] != corpus.words:
        raise ValueError(f"lm_checkpoint {uri!r} was trained on a different vocabulary "
                         f"({len(blob['words'])} words) than data_dir/lm_prefix ({corpus.vocab_size} words)")
    sizes = blob["sizes"]
    model = LSTMLM(corpus.vocab_size, sizes["embed"], sizes["hidden"], sizes["layers"]).to(device)
    model.load_state_dict(blob["state_dict"])
    return model


def _detach(state):
    return tuple(s.detach() for s in state) if state is not None else None


def train_lm(cfg: Config, run) -> None:
    """Train (unless ``lm_checkpoint``), then evaluate with the memory (unless ``train_only``)."""
    device = run.device
    gen = seed_everything(cfg.seed)
    corpus = load_corpus(run, cfg.data_dir, cfg.lm_prefix, cfg.lm_train_tokens, cfg.lm_eval_tokens)
    ids = {k: v.to(device) for k, v in corpus.ids.items()}
    ckpt = run.load_checkpoint() or {}
    results: dict[str, float] = dict(ckpt.get("results", {}))
    if cfg.lm_checkpoint is not None:
        model = load_model(run, seeded(cfg.lm_checkpoint, cfg), corpus, device)
        step = 0
    else:
        model = LSTMLM(corpus.vocab_size, cfg.lm_embed, cfg.lm_hidden, cfg.lm_layers, cfg.lm_dropout).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lm_lr)
        data = batchify(ids["train"], cfg.lm_batch)
        per_epoch = max(1, (data.shape[1] - 1) // cfg.lm_bptt)
        total = per_epoch * cfg.lm_epochs
        if cfg.lm_max_steps is not None:
            total = min(total, cfg.lm_max_steps)
        step, hidden, running = 0, None, []
        if ckpt.get("phase") == "eval":   # training had finished: only evaluation is left
            model.load_state_dict(ckpt["model"])
            step = total = ckpt["step"]
        elif ckpt:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            step, hidden = ckpt["step"], ckpt["hidden"]
            gen.set_state(ckpt["gen"])
            set_rng_state(ckpt["rng"])
        while step < total:
            i = step % per_epoch
            if i == 0:
                hidden = None   # each epoch starts the streams afresh
            x = data[:, i * cfg.lm_bptt:(i + 1) * cfg.lm_bptt]
            y = data[:, i * cfg.lm_bptt + 1:(i + 1) * cfg.lm_bptt + 1]
            x = x[:, :y.shape[1]]
            logits, hidden = model(x, hidden)
            hidden = _detach(hidden)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            if cfg.lm_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.lm_clip)
            opt.step()
            running.append(float(loss.detach()))
            step += 1
            end_of_epoch = step % per_epoch == 0 or step == total
            if step % cfg.report_every == 0 or end_of_epoch:
                metrics = {"train/loss": sum(running) / len(running)}
                running = []
                if end_of_epoch:
                    metrics["valid/ppl_lstm"] = evaluate_lstm(model, ids["valid"])
                run.save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                                     "hidden": hidden, "gen": gen.get_state(), "rng": rng_state(),
                                     "results": results})
                run.report(step, **metrics)
        if cfg.save_model_to is not None and not results.get("saved"):
            save_model(run, model, corpus, cfg, seeded(cfg.save_model_to, cfg))
            results["saved"] = 1.0
    if cfg.train_only:
        run.report(step, **{"valid/ppl_lstm": evaluate_lstm(model, ids["valid"]),
                            "test/ppl_lstm": evaluate_lstm(model, ids["test"])})
        return
    model_state = model.state_dict() if cfg.lm_checkpoint is None else None
    for split in ("valid", "test"):
        if f"{split}/ppl" in results:
            continue   # done before an interruption
        mix, alone = evaluate_with_memory(model, ids[split], cfg)
        results[f"{split}/ppl"], results[f"{split}/ppl_lstm"] = mix, alone
        run.save_checkpoint({"model": model_state, "step": step, "results": results, "phase": "eval"})
    run.report(step, **{k: v for k, v in results.items() if k != "saved"})
