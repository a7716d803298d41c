"""From a spec to cells: pure, no Ray.

A cell is ``(trainer, fully resolved config, seed)``; its id is a hash of exactly that, so
the same spec always yields the same cells in the same order, adding seeds appends cells,
and a cell's id does not change when a default value is spelled out in the YAML.

Order: seeds outermost (every configuration gets its first seed before any gets a second),
then variants in file order, then the product of the parameters in declaration order.
Random search draws its samples here, from a generator seeded by the sweep's name, so the
cells of a random sweep are as fixed as a grid's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from hpsweep.domains import GRID_KINDS
from hpsweep.fmt import fmt_value

if TYPE_CHECKING:  # spec.py imports this module (trial_configs): no cycle at run time
    from hpsweep.spec import SweepSpec

__all__ = ["Cell", "plan", "cell_id", "trial_configs", "resolve_config"]


@dataclasses.dataclass(frozen=True)
class Cell:
    id: str
    index: int              # position in the plan
    seed: int
    params: dict            # the swept values only (what distinguishes cells)
    config: dict            # the full resolved trainer config, seed included

    def label(self) -> str:
        shown = " ".join(f"{k}={fmt_value(v)}" for k, v in self.params.items())
        return f"{shown} seed={self.seed}".strip()


def cell_id(trainer: str, config: dict) -> str:
    """Content id of a cell: hash of the trainer name and its full config (seed included)."""
    text = json.dumps({"trainer": trainer, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve_config(spec: SweepSpec, values: dict, seed: int) -> dict:
    """The trainer's Config for these swept values and seed, as a JSON-able dict (defaults in)."""
    from trainers import load_trainer
    from trainers.common.config import build_config

    info = load_trainer(spec.trainer)
    config, problems = build_config(info.Config, {**spec.config, **values, "seed": seed})
    if problems:  # load_spec has already checked every cell; reaching here is a bug
        raise ValueError(f"cell {values} seed={seed}: {problems}")
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _combos(domains: dict) -> Iterator[dict]:
    """The product of the grid domains, in declaration order (sampled ones left out)."""
    grid = {k: d.values() if hasattr(d, "values") else [d.value] for k, d in domains.items()
            if type(d) in GRID_KINDS.values() or hasattr(d, "value")}
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, combo, strict=True))


def _sampled(domains: dict) -> dict:
    return {k: d for k, d in domains.items() if not (type(d) in GRID_KINDS.values() or hasattr(d, "value"))}


def _blocks(spec: SweepSpec) -> list[dict]:
    """The parameter domains of each variant (or the one block when there are no variants)."""
    if not spec.variants:
        return [dict(spec.parameters)]
    return [{**spec.parameters, **variant} for variant in spec.variants]


def _excluded(spec: SweepSpec, values: dict) -> bool:
    for rule in spec.exclude:
        if all(k in values and (values[k] in v if isinstance(v, list) else values[k] == v)
               for k, v in rule.items()):
            return True
    return False


def _draw(domain: Any, rng: random.Random) -> Any:
    if hasattr(domain, "choice"):
        return rng.choice(domain.choice)
    if hasattr(domain, "uniform"):
        return rng.uniform(*domain.uniform)
    if hasattr(domain, "loguniform"):
        lo, hi = domain.loguniform
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if hasattr(domain, "randint"):
        return rng.randint(*domain.randint)
    raise TypeError(domain)


def _points(spec: SweepSpec) -> list[dict]:
    """Every configuration of the sweep (without seeds), in order, duplicates removed."""
    points: list[dict] = []
    seen: set[str] = set()
    rng = random.Random(f"hpsweep:{spec.name}")
    samples = spec.search.samples if spec.search.algorithm == "random" else 1
    for block in _blocks(spec):
        sampled = _sampled(block)
        for combo in _combos(block):
            for _ in range(samples):
                values = {**combo, **{k: _draw(d, rng) for k, d in sampled.items()}}
                ordered = {k: values[k] for k in block}
                if _excluded(spec, ordered):
                    continue
                key = json.dumps(ordered, sort_keys=True, default=str)
                if key not in seen:
                    seen.add(key)
                    points.append(ordered)
    return points


def plan(spec: SweepSpec) -> list[Cell]:
    """Expand the spec into its cells. For an optuna search, the cells are not known in
    advance (the sampler chooses them as results arrive): this returns []."""
    if spec.search.algorithm == "optuna":
        return []
    cells: list[Cell] = []
    for seed in spec.seed_list:
        for values in _points(spec):
            config = resolve_config(spec, values, seed)
            cells.append(Cell(cell_id(spec.trainer, config), len(cells), seed, values, config))
    return cells


def trial_configs(spec: SweepSpec) -> Iterator[dict]:
    """Swept values to check against the trainer's Config: every grid point, and for sampled
    domains their extremes (low and high, every choice)."""
    for block in _blocks(spec):
        sampled = _sampled(block)
        extremes = {k: (d.choice if hasattr(d, "choice") else
                        list(getattr(d, "uniform", None) or getattr(d, "loguniform", None) or d.randint))
                    for k, d in sampled.items()}
        for combo in _combos(block):
            if not extremes:
                yield combo
                continue
            for corner in itertools.product(*extremes.values()):
                yield {**combo, **dict(zip(extremes, corner, strict=True))}
