"""The points of a sweep and their trainer configs, each distinct config validated once.

A point is one assignment of the swept parameters (no seed). Order: variants in file order,
then the product of the grid domains in declaration order, then (random search) the samples
drawn from a generator seeded by the sweep's name, so the points of a random sweep are as
fixed as a grid's; points excluded by ``exclude`` or equal to an earlier one are left out.

:func:`resolve` validates the config of every point once, through the trainer's own Config
(pydantic, :mod:`hpsweep.trainer.config`), in the process that plans, and keeps the resolved
configs (defaults in) with the text their cell ids hash: :mod:`hpsweep.spec.plan` crosses them with
the seeds without validating again, and a trial trusts them. The seed is set to the first seed
while validating: the sweep's own model checks every seed (ints >= 0), and the spec checks the
fixed options with each seed once, so a seed cannot make a config invalid that another seed
makes valid. Only the trainer's ``config`` module is imported (no torch).

Pure: no Ray, no MLflow; it does not import :mod:`hpsweep.spec` (which calls it) nor
:mod:`hpsweep.spec.plan` (which reads it).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from collections.abc import Iterator
from typing import Any

__all__ = ["Resolved", "points", "corners", "resolve", "id_text"]


def _blocks(spec) -> list[dict]:
    """The parameter domains of each variant (or the one block when there are no variants)."""
    if not spec.variants:
        return [dict(spec.parameters)]
    return [{**spec.parameters, **variant} for variant in spec.variants]


def _combos(block: dict) -> Iterator[dict]:
    """The product of the grid domains, in declaration order (sampled ones left out)."""
    grid = {k: d.values() for k, d in block.items() if not d.sampled}
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, combo, strict=True))


def _excluder(spec):
    rules = [[(k, v) for k, v in rule.items()] for rule in spec.exclude]
    if not rules:
        return lambda values: False

    def excluded(values: dict) -> bool:
        for rule in rules:
            if all(k in values and (values[k] in v if isinstance(v, list) else values[k] == v)
                   for k, v in rule):
                return True
        return False
    return excluded


def points(spec) -> list[dict]:
    """Every point of the sweep (swept values, no seed), in order, duplicates removed."""
    out: list[dict] = []
    seen: set[str] = set()
    rng = random.Random(f"hpsweep:{spec.name}")
    samples = spec.search.samples if spec.search.algorithm == "random" else 1
    excluded = _excluder(spec)
    for block in _blocks(spec):
        sampled = {k: d for k, d in block.items() if d.sampled}
        order = list(block)
        for combo in _combos(block):
            for _ in range(samples):
                values = {**combo, **{k: d.sample(rng) for k, d in sampled.items()}}
                ordered = {k: values[k] for k in order}
                if excluded(ordered):
                    continue
                key = json.dumps(ordered, sort_keys=True, default=str)
                if key not in seen:
                    seen.add(key)
                    out.append(ordered)
    return out


def corners(spec) -> Iterator[dict]:
    """For sampled domains, the values to check that no sample can break the Config: every
    grid point crossed with the extremes of the sampled domains (low and high, every choice)."""
    for block in _blocks(spec):
        extremes = {k: d.extremes() for k, d in block.items() if d.sampled}
        if not extremes:
            continue
        for combo in _combos(block):
            for corner in itertools.product(*extremes.values()):
                yield {**combo, **dict(zip(extremes, corner, strict=True))}


@dataclasses.dataclass
class Resolved:
    """The validated points of a sweep: for each, the swept values, the full resolved config
    (JSON-able, seed = the first seed) and its cell-id text around the seed."""
    trainer: str
    values: list[dict]
    configs: list[dict]
    prefixes: list[str]
    suffixes: list[str]


def id_text(trainer: str, config: dict) -> str:
    """The text a cell id hashes: the trainer and the full config, keys sorted."""
    return json.dumps({"trainer": trainer, "config": config}, sort_keys=True, default=str)


class _Encoder:
    """``id_text`` in pieces: each (key, value) pair encoded once, the seed left as a hole."""

    def __init__(self, trainer: str) -> None:
        self.tail = '}, "trainer": ' + json.dumps(trainer) + "}"
        self.cache: dict[tuple, str] = {}

    def piece(self, key: str, value: Any) -> str:
        try:
            token = (key, type(value), value)
            hit = self.cache.get(token)
        except TypeError:  # a list: not hashable
            return f"{json.dumps(key)}: {json.dumps(value, sort_keys=True, default=str)}"
        if hit is None:
            hit = self.cache[token] = f"{json.dumps(key)}: {json.dumps(value, sort_keys=True, default=str)}"
        return hit

    def split(self, config: dict) -> tuple[str, str]:
        before, after, seen_seed = [], [], False
        for key in sorted(config):
            if key == "seed":
                seen_seed = True
            else:
                (after if seen_seed else before).append(self.piece(key, config[key]))
        head = '{"config": {' + "".join(p + ", " for p in before) + '"seed": '
        return head, "".join(", " + p for p in after) + self.tail


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.loads(json.dumps(value, default=str))


def resolve(spec, config_cls: type, fixed_seed: int | None = None):
    """Validate each point's config once. Returns ``(resolved, failures)``: ``failures`` lists
    ``(values, problems)`` for the points (and, for sampled domains, the corners) whose config
    the trainer refuses; ``resolved`` is None for an optuna search or when anything failed."""
    from hpsweep.trainer.config import build_config

    seed = spec.seed_list[0] if fixed_seed is None else fixed_seed
    base = {**spec.config, "seed": seed}
    failures: list[tuple[dict, list]] = []
    names = list(config_cls.__dataclass_fields__)
    encoder = _Encoder(spec.trainer)
    optuna = spec.search.algorithm == "optuna"
    resolved = Resolved(spec.trainer, [], [], [], [])
    for values in ([] if optuna else points(spec)):
        config, problems = build_config(config_cls, {**base, **values})
        if problems:
            failures.append((values, problems))
            continue
        if failures:
            continue  # keep validating (every problem at once), stop resolving
        full = {name: _jsonable(getattr(config, name)) for name in names}
        head, tail = encoder.split(full)
        resolved.values.append(values)
        resolved.configs.append(full)
        resolved.prefixes.append(head)
        resolved.suffixes.append(tail)
    seen: set[str] = set()
    for values in corners(spec):
        key = json.dumps(values, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        _, problems = build_config(config_cls, {**base, **values})
        if problems:
            failures.append((values, problems))
    return (None if failures or optuna else resolved), failures
