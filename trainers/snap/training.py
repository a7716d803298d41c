"""The SnAp training loop: one function, top to bottom.

A training step is one batch of sequences (charlm: random crops; copy: patterns at the
curriculum's length), started from a zero state and processed in windows of ``window`` steps
with the state carried across. BPTT backpropagates within each window and updates at its end;
the online methods carry the state and the influence across windows and update every
``update_every`` steps (default: at each window end). Since every step starts fresh sequences,
no RNN state or influence outlives a step, and a checkpoint at a report is complete with the
model, the optimiser, the generators, the step and the curriculum.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from hpsweep.trainer.seeding import rng_state, seed_everything, set_rng_state
from trainers.snap.cells import SparseRNN
from trainers.snap.config import Config
from trainers.snap.gradients import bptt_window
from trainers.snap.influence import Online
from trainers.snap.tasks import COPY_INPUTS, ByteCorpus, Curriculum, copy_batch

__all__ = ["evaluate", "train", "train_step"]

LN2 = math.log(2.0)


def train_step(model: SparseRNN, optimizer: torch.optim.Optimizer, online: Online | None,
               inputs: torch.Tensor, targets: torch.Tensor, config: Config) -> tuple[float, int]:
    """Train on one batch of sequences; returns ``(total loss in bits, number of targets)``."""
    T, B = targets.shape
    segment = config.window if online is None or config.update_every is None else config.update_every
    valid = targets >= 0
    weights = torch.zeros(T, B, dtype=inputs.dtype, device=inputs.device)
    for start in range(0, T, segment):  # each update is the mean over its own targets
        count = valid[start:start + segment].sum()
        weights[start:start + segment] = valid[start:start + segment] / count.clamp(min=1)
    counts = [int(valid[a:a + segment].sum()) for a in range(0, T, segment)]
    has_loss = valid.any(1).tolist()
    total = 0.0
    s = model.initial_state(B)
    if online is None:
        for k, start in enumerate(range(0, T, segment)):
            sl = slice(start, start + segment)
            loss, s = bptt_window(model, inputs[sl], targets[sl], weights[sl], s.detach())
            if counts[k]:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * counts[k]
        return total / LN2, sum(counts)
    online.reset_influence()
    online.zero_grad()
    effective = model.effective()
    seg_loss = 0.0
    for t in range(T):
        s, loss = online.step(inputs[t], s, targets[t], weights[t], effective, has_loss=has_loss[t])
        seg_loss += float(loss)
        if (t + 1) % segment == 0 or t + 1 == T:
            k = t // segment
            if counts[k]:
                grads = online.gradients()
                for name, p in model.named_parameters():
                    p.grad = grads[name]
                optimizer.step()
                online.zero_grad()
                effective = model.effective()
                total += seg_loss * counts[k]
            seg_loss = 0.0
    return total / LN2, sum(counts)


@torch.no_grad()
def evaluate(model: SparseRNN, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Bits per character of ``targets`` (ignoring ``< 0``) from a zero state."""
    weights = model.effective()
    s = model.initial_state(targets.shape[1])
    nats, count = 0.0, 0
    for t in range(targets.shape[0]):
        s = model.step(inputs[t], s, weights)
        keep = targets[t] >= 0
        if keep.any():
            nats += F.cross_entropy(model.logits(s)[keep], targets[t][keep], reduction="sum").item()
            count += int(keep.sum())
    return nats / max(count, 1) / LN2


def train(config: Config, run) -> None:
    """Train per ``config``, reporting through ``run`` every ``eval_every`` steps and at the end."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = run.device
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    seed_everything(config.seed)
    generator = torch.Generator().manual_seed(config.seed + 1_000_003)  # data and UORO's noise
    corpus = None
    if config.task == "charlm":
        corpus = ByteCorpus.load(run.data_path(config.data), config.valid_fraction,
                                 min_length=config.seq_len + 1)
        inputs_dim = outputs_dim = ByteCorpus.VOCAB
    else:
        inputs_dim, outputs_dim = COPY_INPUTS, 2
    model = SparseRNN(config.cell, inputs_dim, config.hidden, outputs_dim, config.density,
                      seed=config.seed, dtype=dtype).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                                 eps=config.adam_eps)
    online = (None if config.method == "bptt"
              else Online(model, config.method, config.batch, generator, pattern=config.snap_pattern))
    curriculum = Curriculum(config.curriculum_threshold, config.curriculum_window, config.max_length)
    step = 0
    state = run.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        curriculum.load_state_dict(state["curriculum"])
        step = int(state["step"])

    def batch_of(split: str, gen: torch.Generator | None, length: int):
        if corpus is None:
            x, y = copy_batch(length, config.batch, gen)
        elif gen is None:
            crops = corpus.fixed_crops(split, config.batch * config.eval_batches, config.seq_len)
            x, y = ByteCorpus.encode(crops, dtype)
        else:
            x, y = ByteCorpus.encode(corpus.crops(split, config.batch, config.seq_len, gen), dtype)
        return x.to(device=device, dtype=dtype), y.to(device)

    bits, count, since = 0.0, 0, step
    started = time.perf_counter()
    while step < config.steps:
        x, y = batch_of("train", generator, curriculum.length)
        b, n = train_step(model, optimizer, online, x, y, config)
        step += 1
        bits, count = bits + b, count + n
        if corpus is None:
            curriculum.update(b / max(n, 1))
        if step % config.eval_every and step != config.steps:
            continue
        metrics = {"train/bpc": bits / max(count, 1)}
        if corpus is not None:
            metrics["valid/bpc"] = evaluate(model, *batch_of("valid", None, 0))
            if config.test and step == config.steps:
                metrics["test/bpc"] = evaluate(model, *batch_of("test", None, 0))
        else:
            # a fresh batch at the current length, the same for a given (seed, step)
            held_out = torch.Generator().manual_seed(config.seed * 7_919 + step)
            metrics["valid/bpc"] = evaluate(model, *batch_of("valid", held_out, curriculum.length))
            metrics["curriculum/length"] = float(curriculum.length)
        elapsed = time.perf_counter() - started
        metrics["perf/steps_per_sec"] = (step - since) / elapsed if elapsed > 0 else 0.0
        run.save_checkpoint({
            "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(), "rng": rng_state(),
            "curriculum": curriculum.state_dict(), "config": config.__dict__,
        })
        run.report(step, **metrics)
        bits, count, since, started = 0.0, 0, step, time.perf_counter()
