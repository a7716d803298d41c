"""The MNIST experiments: permuted MNIST (continual learning) and incremental classes.

One parametric training loop (an MLP trained with Adam) shared by all methods; ``ewc`` adds a
diagonal-Fisher penalty per finished task; ``mbpa`` writes every training example into the
episodic memory (outside the gradient, in the first epoch over a task's data) and adapts the
output network per query at prediction time. ``sgd`` and ``mbpa`` with the same seed train the
very same network, so their difference is local adaptation alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from hpsweep.trainer.seeding import rng_state, seed_everything, set_rng_state
from trainers.mbpa.adapt import FirstStep, adapt_predict_mlp, first_step_terms, mlp_layers
from trainers.mbpa.config import Config
from trainers.mbpa.data import load_images
from trainers.mbpa.memory import EpisodicMemory, kernel_weights
from trainers.mbpa.models import MLP

__all__ = ["train_permuted", "train_incremental", "mbpa_logits", "memory_key"]

EVAL_BATCH = 256


def memory_key(model: MLP, x: torch.Tensor, keys: str) -> torch.Tensor:
    """The memory key of inputs ``x``: the pixels, or the MLP's last hidden layer."""
    if keys == "pixels":
        return x
    with torch.no_grad():
        return model.features(x)


def _adapted_network(model: MLP, cfg: Config) -> torch.nn.Module:
    """g: the whole MLP with pixel keys, its output layer with hidden keys."""
    return model if cfg.keys == "pixels" else model.out


def memory_terms(model: MLP, memory: EpisodicMemory, cfg: Config) -> FirstStep | None:
    """What one SGD step needs from every memory slot at theta, computed once for a whole
    evaluation pass (memory and theta are fixed during it); None when adaptation is not a
    single SGD step."""
    if cfg.steps != 1 or cfg.local_optimizer != "sgd" or cfg.alpha == 0.0 or len(memory) == 0:
        return None
    size = len(memory)
    return first_step_terms(mlp_layers(_adapted_network(model, cfg)), memory.keys[:size], memory.values[:size])


def _evaluation_terms(model: MLP, memory: EpisodicMemory | None, cfg: Config) -> FirstStep | None:
    """:func:`memory_terms` once for an evaluation phase (every set it scores), or None."""
    return memory_terms(model, memory, cfg) if memory is not None and len(memory) > 0 else None


def mbpa_logits(model: MLP, memory: EpisodicMemory, x: torch.Tensor, cfg: Config,
                terms: FirstStep | None = None) -> torch.Tensor:
    """Predictions for ``x`` after local adaptation on its K nearest memories (theta untouched).

    ``terms``: :func:`memory_terms` of this memory and model, when evaluating many batches.
    """
    q = memory_key(model, x, cfg.keys)
    d2, slots = memory.nearest(q, cfg.neighbours)
    w = kernel_weights(d2, cfg.kernel_eps, cfg.normalise_weights)
    nb_y = memory.values[slots]
    # one SGD step from memory terms reads no neighbour key: skip gathering (B, K, D) of them
    nb_x = None if terms is not None else memory.keys.index_select(0, slots.reshape(-1)).view(*slots.shape, -1)
    return adapt_predict_mlp(mlp_layers(_adapted_network(model, cfg)), nb_x, nb_y, w, q, steps=cfg.steps,
                             lr=cfg.alpha, beta=cfg.beta, optimizer=cfg.local_optimizer, decay=cfg.rmsprop_decay,
                             eps=cfg.rmsprop_eps, nb_idx=slots, nb_d2=d2, terms=terms, chunk=cfg.adapt_chunk)


def accuracy(model: MLP, x: torch.Tensor, y: torch.Tensor, cfg: Config, memory: EpisodicMemory | None,
             terms: FirstStep | None = None) -> float:
    """Accuracy of the model (with MbPA when ``memory`` holds anything) on (x, y).

    ``terms``: :func:`memory_terms`, when several sets are evaluated with the same memory and model.
    """
    model.eval()
    adapt = memory is not None and len(memory) > 0
    if adapt and terms is None:
        terms = memory_terms(model, memory, cfg)
    correct = 0
    for i in range(0, x.shape[0], EVAL_BATCH):
        xb = x[i:i + EVAL_BATCH]
        if adapt:
            logits = mbpa_logits(model, memory, xb, cfg, terms)
        else:
            with torch.no_grad():
                logits = model(xb)
        correct += int((logits.argmax(1) == y[i:i + EVAL_BATCH]).sum())
    model.train()
    return correct / max(1, x.shape[0])


def fisher_diagonal(model: MLP, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: mean over examples of squared per-example log-likelihood gradients."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def logp(p, xi, yi):
        return -F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(0, x.shape[0], 256):
        g = vmap(grad(logp), in_dims=(None, 0, 0))(params, x[i:i + 256], y[i:i + 256])
        for n in total:
            total[n] += (g[n] ** 2).sum(0)
    return {n: t / x.shape[0] for n, t in total.items()}


def ewc_penalty(model: MLP, anchors: list[dict], strength: float) -> torch.Tensor:
    """(lambda / 2) sum_tasks sum_i F_i (theta_i - theta*_i)^2."""
    penalty = 0.0
    for anchor in anchors:
        for n, p in model.named_parameters():
            penalty = penalty + (anchor["fisher"][n] * (p - anchor["theta"][n]) ** 2).sum()
    return 0.5 * strength * penalty


def split_generator(cfg: Config) -> torch.Generator:
    """The data split's own random stream (permutations, subsets), apart from the seed's."""
    return torch.Generator().manual_seed(1_000_003 * (cfg.split + 1))


def _device_data(cfg: Config, run, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in load_images(run, cfg).items()}


def _train_epoch(model, opt, x, y, cfg, gen, memory, anchors, write: bool) -> float:
    order = torch.randperm(x.shape[0], generator=gen).to(x.device)
    total, batches = 0.0, 0
    for i in range(0, x.shape[0], cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        xb, yb = x[idx], y[idx]
        if write and memory is not None:   # written with the parameters of the time, no gradient
            memory.write(memory_key(model, xb, cfg.keys), yb)
        loss = F.cross_entropy(model(xb), yb)
        if anchors:
            loss = loss + ewc_penalty(model, anchors, cfg.ewc_lambda)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach())
        batches += 1
    return total / max(1, batches)


def _new_state(cfg: Config, device: torch.device, inputs: int = 784, classes: int = 10):
    model = MLP(cfg.hidden, classes=classes, inputs=inputs).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    memory = None
    if cfg.method == "mbpa":
        memory = EpisodicMemory(cfg.memory_size, inputs if cfg.keys == "pixels" else cfg.hidden, device,
                                index=cfg.memory_index, nprobe=cfg.index_nprobe, nlist=cfg.index_nlist)
    return model, opt, memory


def _checkpoint(model, opt, memory, gen, **extra) -> dict:
    return {"model": model.state_dict(), "opt": opt.state_dict(),
            "memory": memory.state_dict() if memory is not None else None,
            "gen": gen.get_state(), "rng": rng_state(), **extra}


def _restore(state, model, opt, memory, gen) -> None:
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    if memory is not None:
        memory.load_state_dict(state["memory"])
    gen.set_state(state["gen"])
    set_rng_state(state["rng"])


def train_permuted(cfg: Config, run) -> None:
    """Permuted MNIST: tasks in sequence; after each, test accuracy on every task so far."""
    device = run.device
    gen = seed_everything(cfg.seed)
    data = _device_data(cfg, run, device)
    split = split_generator(cfg)
    perms = [torch.randperm(784, generator=split).to(device) for _ in range(cfg.num_tasks)]
    pool = torch.randperm(data["train_x"].shape[0], generator=split).to(device)
    valid_idx = pool[:cfg.valid_per_task]   # the same held-out images for every task
    rest = pool[cfg.valid_per_task:]
    train_idx = [rest[torch.randperm(rest.shape[0], generator=split).to(device)[:cfg.train_per_task]]
                 for _ in range(cfg.num_tasks)]
    n_test = cfg.test_per_task or data["test_x"].shape[0]
    test_x, test_y = data["test_x"][:n_test], data["test_y"][:n_test]
    model, opt, memory = _new_state(cfg, device)
    anchors: list[dict] = []
    start = 0
    state = run.load_checkpoint()
    if state is not None:
        _restore(state, model, opt, memory, gen)
        anchors = [{k: {n: t.to(device) for n, t in a[k].items()} for k in a} for a in state["anchors"]]
        start = state["task"]
    for task in range(start, cfg.num_tasks):
        perm = perms[task]
        x = data["train_x"][train_idx[task]][:, perm]
        y = data["train_y"][train_idx[task]]
        loss = 0.0
        for epoch in range(cfg.epochs_per_task):
            loss = _train_epoch(model, opt, x, y, cfg, gen, memory, anchors, write=epoch == 0)
        if cfg.method == "ewc":
            n = min(cfg.fisher_samples, x.shape[0])
            anchors.append({"fisher": fisher_diagonal(model, x[:n], y[:n]),
                            "theta": {k: p.detach().clone() for k, p in model.named_parameters()}})
        metrics = {"train/loss": loss}
        accs, valid_accs = [], []
        terms = _evaluation_terms(model, memory, cfg)
        for j in range(task + 1):
            accs.append(accuracy(model, test_x[:, perms[j]], test_y, cfg, memory, terms))
            metrics[f"acc/task_{j}"] = accs[-1]
            if cfg.valid_per_task:
                vx = data["train_x"][valid_idx][:, perms[j]]
                valid_accs.append(accuracy(model, vx, data["train_y"][valid_idx], cfg, memory, terms))
        metrics["acc/mean"] = sum(accs) / len(accs)
        if valid_accs:
            metrics["valid/acc_mean"] = sum(valid_accs) / len(valid_accs)
        run.save_checkpoint(_checkpoint(model, opt, memory, gen, task=task + 1, anchors=anchors))
        run.report(task + 1, **metrics)


def train_incremental(cfg: Config, run) -> None:
    """Incremental classes: pretrain on digits 0-4, then train on 0-9 (new classes maybe scarce).

    With an image folder: pretrain on labels below ``pretrain_classes`` (default the first
    half of the sorted class names), then train on all; input size and classes from the data.

    Reports test accuracy on old classes, new classes and all, at update 0 and every
    ``eval_every`` updates of the second phase (``acc/old``, ``acc/new``, ``acc/all``).
    """
    device = run.device
    gen = seed_everything(cfg.seed)
    data = _device_data(cfg, run, device)
    classes = int(data["train_y"].max()) + 1
    first = cfg.pretrain_classes if cfg.pretrain_classes is not None else classes // 2
    if not 1 <= first < classes:
        raise ValueError(f"pretrain_classes must be in [1, {classes - 1}] for {classes} classes, got {first}")
    old = data["train_y"] < first
    old_idx = torch.nonzero(old).flatten()
    new_idx = torch.nonzero(~old).flatten()
    split = split_generator(cfg)
    old_idx = old_idx[torch.randperm(old_idx.shape[0], generator=split).to(device)[:cfg.train_per_task]]
    n_new = max(1, int(round(cfg.train_per_task * cfg.new_class_fraction)))
    new_idx = new_idx[torch.randperm(new_idx.shape[0], generator=split).to(device)[:n_new]]
    phase2 = torch.cat([old_idx, new_idx])
    phase2 = phase2[torch.randperm(phase2.shape[0], generator=gen).to(device)]
    n_test = cfg.test_per_task or data["test_x"].shape[0]
    test_x, test_y = data["test_x"][:n_test], data["test_y"][:n_test]
    test_old = test_y < first
    model, opt, memory = _new_state(cfg, device, inputs=data["train_x"].shape[1], classes=classes)
    state = run.load_checkpoint()
    update = 0
    resumed = state is not None   # the checkpoint was saved right before its report: no repeat
    if state is not None:
        _restore(state, model, opt, memory, gen)
        update = state["update"]
    else:
        x, y = data["train_x"][old_idx], data["train_y"][old_idx]
        for epoch in range(cfg.pretrain_epochs):
            _train_epoch(model, opt, x, y, cfg, gen, memory, [], write=epoch == 0)
    batches_per_pass = -(-phase2.shape[0] // cfg.batch_size)
    while True:
        if not resumed and (update % cfg.eval_every == 0 or update == cfg.incremental_updates):
            terms = _evaluation_terms(model, memory, cfg)
            acc_old = accuracy(model, test_x[test_old], test_y[test_old], cfg, memory, terms)
            acc_new = accuracy(model, test_x[~test_old], test_y[~test_old], cfg, memory, terms)
            n_old = int(test_old.sum())
            acc_all = (acc_old * n_old + acc_new * (n_test - n_old)) / n_test
            run.save_checkpoint(_checkpoint(model, opt, memory, gen, update=update))
            run.report(update, **{"acc/old": acc_old, "acc/new": acc_new, "acc/all": acc_all})
        resumed = False
        if update >= cfg.incremental_updates:
            break
        b = update % batches_per_pass
        idx = phase2[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        xb, yb = data["train_x"][idx], data["train_y"][idx]
        if memory is not None:
            memory.write(memory_key(model, xb, cfg.keys), yb)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update += 1
