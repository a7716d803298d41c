"""From a spec to cells: pure, no Ray.

A cell is ``(trainer, fully resolved config, seed)``; its id is a hash of exactly that, so
the same spec always yields the same cells in the same order, adding seeds appends cells,
and a cell's id does not change when a default value is spelled out in the YAML.

Order: seeds outermost (every configuration gets its first seed before any gets a second),
then variants in file order, then the product of the parameters in declaration order.
The points (swept values, random samples included) and their validated configs come from
:mod:`hpsweep.spec.points`, once per distinct config; this module crosses them with the seeds.
A cell id is the sha256 of :func:`hpsweep.spec.points.id_text`, built from pieces encoded once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING

from hpsweep.fmt import fmt_params
from hpsweep.spec.points import Resolved, id_text, resolve

if TYPE_CHECKING:
    from hpsweep.spec.model import SweepSpec

__all__ = ["Cell", "plan", "cell_id", "resolve_config"]


@dataclasses.dataclass(frozen=True)
class Cell:
    id: str
    index: int              # position in the plan
    seed: int
    params: dict            # the swept values only (what distinguishes cells)
    config: dict            # the full resolved trainer config, seed included

    def label(self) -> str:
        shown = fmt_params(self.params)
        return f"{shown} seed={self.seed}".strip()


def cell_id(trainer: str, config: dict) -> str:
    """Content id of a cell: hash of the trainer name and its full config (seed included)."""
    return hashlib.sha256(id_text(trainer, config).encode()).hexdigest()[:16]


def resolve_config(spec: SweepSpec, values: dict, seed: int) -> dict:
    """The trainer's Config for these swept values and seed, as a JSON-able dict (defaults in):
    for values no plan knew in advance (an optuna sampler's), validated here, once."""
    import json

    from hpsweep.trainer.config import build_config

    config, problems = build_config(spec.trainer_info().Config, {**spec.config, **values, "seed": seed})
    if problems:
        raise ValueError(f"cell {values} seed={seed}: " + "; ".join(
            f"{p.field}: {p.message}" if p.field else p.message for p in problems))
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _resolved(spec: SweepSpec) -> Resolved:
    """The spec's validated points: kept by ``load_spec`` when it checked them, else made here."""
    cached = getattr(spec, "_points", None)
    if cached is not None:
        return cached
    resolved, failures = resolve(spec, spec.trainer_info().Config)
    if failures:  # load_spec reports these with their lines; reaching here is a bug
        values, problems = failures[0]
        raise ValueError(f"cell {values}: {problems}")
    return resolved


def plan(spec: SweepSpec) -> list[Cell]:
    """Expand the spec into its cells. For an optuna search, the cells are not known in
    advance (the sampler chooses them as results arrive): this returns []."""
    if spec.search.algorithm == "optuna":
        return []
    r = _resolved(spec)
    sha256 = hashlib.sha256
    cells: list[Cell] = []
    index = 0
    for seed in spec.seed_list:
        text_seed = str(int(seed))
        for values, base, head, tail in zip(r.values, r.configs, r.prefixes, r.suffixes, strict=True):
            config = dict(base)
            config["seed"] = seed
            cid = sha256((head + text_seed + tail).encode()).hexdigest()[:16]
            cells.append(Cell(cid, index, seed, values, config))
            index += 1
    return cells
