"""The domains a swept parameter can take in a sweep file: grids (run as given) and sampled
distributions (for random and Optuna searches), as strict pydantic models that own their
behaviour, as Optuna's distributions do.

``{grid: [...]}``, ``{pow10: [...]}`` and ``{range: [lo, hi(, step)]}`` are grids;
``{choice: [...]}``, ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}`` and
``{randint: [lo, hi]}`` are sampled. Each model checks its own bounds and puts the values in
its message, and answers the questions the rest of hpsweep asks of a domain:

- ``sampled``: False for a grid (and a fixed value), True for a distribution;
- ``values()``: a grid's values in order (grids and fixed values only);
- ``sample(rng)``: one draw from a ``random.Random`` (every domain; a grid draws uniformly);
- ``extremes()``: the values that bound the domain (every value of a grid or a choice, the
  two ends of a range), which the spec checks against the trainer's Config;
- ``to_tune(tune)``: the Ray Tune search-space object; ``tune`` is handed in by the engine,
  so that this module does not import Ray.
"""

from __future__ import annotations

import math
import random
from typing import Annotated, Any, ClassVar, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

__all__ = ["Model", "Scalar", "Grid", "Pow10", "Range", "Choice", "Uniform", "LogUniform", "RandInt",
           "Fixed", "GRID_KINDS", "SAMPLED_KINDS", "KINDS", "Domain", "VariantValue", "wrap_fixed"]

Scalar = bool | int | float | str | None


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Domain(Model):
    """What every domain answers (see the module docstring)."""
    sampled: ClassVar[bool] = False

    def values(self) -> list:
        raise TypeError(f"{type(self).__name__} is sampled; it has no grid values")

    def sample(self, rng: random.Random) -> Any:
        return rng.choice(self.values())

    def extremes(self) -> list:
        return self.values()

    def to_tune(self, tune: Any) -> Any:
        return tune.choice(self.values())


# --- parameter domains ---------------------------------------------------------------------

def _bounds(v: list, *, strict: bool, positive: bool = False) -> list:
    """Check ``[low, high]``: low < high (``strict``) or low <= high; low > 0 (``positive``)."""
    if positive and v[0] <= 0:
        raise ValueError(f"low must be > 0 for a log scale, got low={v[0]}")
    if (v[0] >= v[1]) if strict else (v[0] > v[1]):
        raise ValueError(f"low must be {'<' if strict else '<='} high, got low={v[0]} high={v[1]}")
    return v


class Grid(_Domain):
    """Grid values, run in the order given."""
    grid: list[Scalar] = Field(min_length=1)

    def values(self) -> list:
        return list(self.grid)


class Pow10(_Domain):
    """A grid of powers of ten: ``{pow10: [-2.5, -3]}`` is ``[10**-2.5, 10**-3]``."""
    pow10: list[float] = Field(min_length=1)

    def values(self) -> list:
        return [10.0 ** e for e in self.pow10]


class Range(_Domain):
    """An integer grid: ``[lo, hi]`` or ``[lo, hi, step]``, both ends included."""
    range: list[int] = Field(min_length=2, max_length=3)

    @field_validator("range")
    @classmethod
    def _ordered(cls, v: list[int]) -> list[int]:
        if len(v) == 3 and v[2] <= 0:
            raise ValueError(f"step must be > 0, got step={v[2]}")
        return _bounds(v, strict=False)

    def values(self) -> list:
        lo, hi, step = (self.range + [1])[:3]
        return list(range(lo, hi + 1, step))


class Choice(_Domain):
    """Sampled uniformly from the values (random and optuna searches)."""
    sampled: ClassVar[bool] = True
    choice: list[Scalar] = Field(min_length=1)

    def sample(self, rng: random.Random) -> Any:
        return rng.choice(self.choice)

    def extremes(self) -> list:
        return list(self.choice)

    def to_tune(self, tune: Any) -> Any:
        return tune.choice(self.choice)


class Uniform(_Domain):
    sampled: ClassVar[bool] = True
    uniform: list[float] = Field(min_length=2, max_length=2)

    _ordered = field_validator("uniform")(lambda cls, v: _bounds(v, strict=True))

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(*self.uniform)

    def extremes(self) -> list:
        return list(self.uniform)

    def to_tune(self, tune: Any) -> Any:
        return tune.uniform(*self.uniform)


class LogUniform(_Domain):
    sampled: ClassVar[bool] = True
    loguniform: list[float] = Field(min_length=2, max_length=2)

    _ordered = field_validator("loguniform")(lambda cls, v: _bounds(v, strict=True, positive=True))

    def sample(self, rng: random.Random) -> float:
        lo, hi = self.loguniform
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))

    def extremes(self) -> list:
        return list(self.loguniform)

    def to_tune(self, tune: Any) -> Any:
        return tune.loguniform(*self.loguniform)


class RandInt(_Domain):
    """An integer drawn uniformly from ``[lo, hi]``, both ends included."""
    sampled: ClassVar[bool] = True
    randint: list[int] = Field(min_length=2, max_length=2)

    _ordered = field_validator("randint")(lambda cls, v: _bounds(v, strict=False))

    def sample(self, rng: random.Random) -> int:
        return rng.randint(*self.randint)

    def extremes(self) -> list:
        return list(self.randint)

    def to_tune(self, tune: Any) -> Any:
        return tune.randint(self.randint[0], self.randint[1] + 1)  # Tune's upper end is excluded


class Fixed(_Domain):
    """A bare scalar in a variant: one fixed value."""
    value: Scalar

    def values(self) -> list:
        return [self.value]

    def to_tune(self, tune: Any) -> Any:
        return self.value


GRID_KINDS = {"grid": Grid, "pow10": Pow10, "range": Range}
SAMPLED_KINDS = {"choice": Choice, "uniform": Uniform, "loguniform": LogUniform, "randint": RandInt}
KINDS = {**GRID_KINDS, **SAMPLED_KINDS}


def _param_tag(v: Any) -> str | None:
    if isinstance(v, BaseModel):
        return next(k for k, cls in {**KINDS, "value": Fixed}.items() if isinstance(v, cls))
    if isinstance(v, dict):
        keys = [k for k in v if k in KINDS]
        return keys[0] if len(keys) == 1 and len(v) == 1 else None
    return None


def _variant_tag(v: Any) -> str | None:
    if isinstance(v, dict) and list(v) == ["value"]:
        return None if isinstance(v["value"], (list, dict)) else "value"
    if isinstance(v, (dict, BaseModel)):
        return _param_tag(v)
    return "value"


_ONE_OF = "one of " + ", ".join(KINDS)
Domain = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in KINDS.items())],  # noqa: UP007 (built at run time)
    Discriminator(_param_tag, custom_error_type="domain",
                  custom_error_message=f"must be a mapping with exactly one key: {_ONE_OF}"),
]
VariantValue = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in KINDS.items())  # noqa: UP007
          + (Annotated[Fixed, Tag("value")],)],
    Discriminator(_variant_tag, custom_error_type="domain",
                  custom_error_message=f"must be a scalar or a mapping with exactly one key: {_ONE_OF}"),
]


def wrap_fixed(v: Any) -> Any:
    return v if isinstance(v, (dict, BaseModel)) else {"value": v}
