"""The sweep YAML, typed and strict.

``load_spec(path)`` returns a frozen :class:`SweepSpec` or raises one :class:`SpecError`
listing every problem found, each as ``FILE:LINE: field.path: problem (did you mean ...)``.
The trainer's own ``Config`` dataclass checks the trainer options of every cell, and the
trainer's declared metrics check the sweep's metric, so a typo is caught before anything
is launched. The format is documented in ``sweeps/README.md``; ``hpsweep schema`` prints
the JSON Schema of the models below.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, PrivateAttr, Tag, ValidationError, field_validator, model_validator

from hpsweep.spec import overrides as _overrides
from hpsweep.spec import requirements
from hpsweep.spec.checks import check_against_trainer, check_raw_against_trainer
from hpsweep.spec.domains import GRID_KINDS, KINDS, SAMPLED_KINDS, Domain, Model, VariantValue, wrap_fixed
from hpsweep.spec.problems import Problem, SpecError
from hpsweep.spec.protocol import Claim, Selection
from hpsweep.spec.yamlload import load_yaml_text

__all__ = ["SpecError", "SweepSpec", "load_spec", "load_spec_text", "Problem", "json_schema",
           "SAMPLED_KINDS", "GRID_KINDS"]

# --- the rest of the sweep -----------------------------------------------------------------

class Metric(Model):
    name: str = Field(min_length=1)
    mode: Literal["min", "max"]


class Search(Model):
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    samples: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _samples(self) -> Search:
        if self.algorithm == "grid" and self.samples is not None:
            raise ValueError("samples is for random and optuna searches; a grid runs every cell "
                             "(repeat it with seeds instead)")
        if self.algorithm != "grid" and self.samples is None:
            raise ValueError(f"algorithm {self.algorithm!r} needs samples: N")
        return self


class Fifo(Model):
    type: Literal["fifo"]


class Asha(Model):
    type: Literal["asha"]
    time_attr: str = "training_iteration"
    max_t: int = Field(default=100, ge=1)
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=3.0, gt=1)

    @model_validator(mode="after")
    def _grace(self) -> Asha:
        if self.grace_period > self.max_t:
            raise ValueError(f"grace_period must be <= max_t, got grace_period={self.grace_period} "
                             f"max_t={self.max_t}")
        return self


Scheduler = Annotated[Fifo | Asha, Field(discriminator="type")]


_MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                 "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class Resources(Model):
    """What one trial asks of a Ray node (Ray's CPU, GPU, memory and custom resources)."""
    cpus: float = Field(default=1.0, gt=0)
    gpus: float = Field(default=0.0, ge=0)
    # bytes of Ray's `memory` resource a trial reserves: a number of bytes or "16GiB", "500MB"
    memory: int | None = None
    # custom resources a node declares (`ray start --resources '{"special": 1}'`, a KubeRay
    # group's rayStartParams, a launcher node type's resources)
    custom: dict[str, float] = Field(default_factory=dict)

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        import re

        if v is None or isinstance(v, bool):
            return v if v is None else _raise(f"must be bytes or a size such as 16GiB, got {v!r}")
        if isinstance(v, (int, float)):
            size = v
        else:
            m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(v))
            unit = m.group(2).lower() if m else None
            if m is None or unit not in _MEMORY_UNITS:
                _raise(f"must be bytes or a size with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), "
                       f"e.g. 16GiB, got {v!r}")
            size = float(m.group(1)) * _MEMORY_UNITS[unit]
        if size <= 0:
            _raise(f"must be > 0, got {v!r}")
        return int(size)

    @field_validator("custom")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"{name!r} is one of Ray's own resources: use cpus, gpus or memory")
            if amount <= 0:
                raise ValueError(f"{name}: must be > 0, got {amount}")
            if amount > 1 and not float(amount).is_integer():
                raise ValueError(f"{name}: more than one must be a whole number, got {amount}")
        return v

    def ray(self) -> dict[str, float]:
        """As Ray Tune's resource request (``tune.with_resources``)."""
        out: dict[str, float] = {"cpu": self.cpus, "gpu": self.gpus}
        if self.memory:
            out["memory"] = self.memory
        return {**out, **self.custom}

    @field_validator("gpus")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError(f"more than one GPU must be a whole number, got gpus={v}")
        return v


class Checkpointing(Model):
    every: int = Field(default=1, ge=1)


class SweepSpec(Model):
    """A validated sweep. Build it with :func:`load_spec`, not directly."""
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    description: str = ""
    trainer: str
    config: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Domain] = Field(default_factory=dict)
    variants: list[dict[str, VariantValue]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    seeds: int | list[int] = 1
    metric: Metric
    search: Search = Search()
    scheduler: Scheduler = Fifo(type="fifo")
    resources: Resources = Resources()
    max_concurrent: int = Field(default=0, ge=0)
    retries: int = Field(default=1, ge=0)
    # cells a trial runs one after another (FIFO grids): "auto" sizes bundles from the cells'
    # measured durations (short cells share a trial; long ones get one each); 1 = one a trial
    bundle: int | Literal["auto"] = "auto"
    checkpoint: Checkpointing = Checkpointing()
    selection: Selection | None = None
    claims: list[Claim] = Field(default_factory=list)
    # Python packages the trainer needs: a list, or a requirements file's path (hpsweep.spec.requirements)
    requirements: list[str] | str | None = None
    # the validated points and configs, kept by load_spec for plan() (hpsweep.spec.points)
    _points: Any = PrivateAttr(default=None)
    # the sweep file's directory (relative data paths resolve under it or the data root)
    _base_dir: Any = PrivateAttr(default=None)
    # where each field came from: a line of the file or a --set (hpsweep.spec.overrides.Sources)
    _sources: Any = PrivateAttr(default=None)
    # the parsed requirements and the line of `requirements:` in the file
    _requirements: Any = PrivateAttr(default=())
    _requirements_line: Any = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _not_outputs(cls, v: str) -> str:
        if v == "outputs":
            raise ValueError("'outputs' is where the storage keeps run.output files; name the sweep otherwise")
        return v

    @field_validator("variants", mode="before")
    @classmethod
    def _fixed_values(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{k: wrap_fixed(x) for k, x in item.items()} if isinstance(item, dict) else item
                    for item in v]
        return v

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds_shape(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, list)):
            raise ValueError(f"must be a count (seeds: 3) or a list of seeds ([0, 1, 2]), got {v!r}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int):
            if v < 1:
                raise ValueError(f"a seed count must be >= 1, got seeds={v}")
        else:
            if not v:
                raise ValueError("the seed list is empty; give a count (seeds: 3) or seeds")
            if any(s < 0 for s in v):
                raise ValueError(f"seeds must be >= 0, got {v}")
            if len(set(v)) != len(v):
                raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @field_validator("bundle")
    @classmethod
    def _bundle(cls, v: int | str, info) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be 'auto' or a number of cells >= 1, got {v}")
        scheduler, search = info.data.get("scheduler"), info.data.get("search")
        if isinstance(v, int) and v > 1 and (getattr(scheduler, "type", "fifo") != "fifo"
                                             or getattr(search, "algorithm", "grid") == "optuna"):
            raise ValueError("a trial runs several cells only under scheduler fifo with grid or random "
                             "search (ASHA and Optuna act on one cell a trial): remove bundle, or set it to 1")
        return v

    def bundles(self) -> bool:
        """Whether trials run bundles of cells (FIFO, cells planned ahead, not ``bundle: 1``)."""
        return self.bundle != 1 and self.scheduler.type == "fifo" and self.search.algorithm != "optuna"

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def spec_hash(self) -> str:
        """A hash of the whole spec (what to run, not where): tags the sweep's parent run."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def data_bases(self) -> list[str]:
        """Where relative data locations resolve, in order: the sweep file's directory, then the
        data root when one is set (:func:`hpsweep.trainer.data.data_root`); absolute, as the
        trial gets them."""
        from hpsweep.trainer.data import data_root

        base = Path(self._base_dir) if self._base_dir is not None else Path.cwd()
        root = data_root()
        return [str(base.absolute())] + ([str(root)] if root is not None else [])

    def trainer_base(self) -> str:
        """Where a file or package ``trainer:`` is found: the sweep file's directory (absolute)."""
        return str((Path(self._base_dir) if self._base_dir is not None else Path.cwd()).absolute())

    def trainer_info(self):
        """The trainer's Config and metrics (:func:`hpsweep.trainer.registry.load_config`)."""
        from hpsweep.trainer.registry import load_config

        return load_config(self.trainer, self.trainer_config(), base_dir=self.trainer_base())

    def trainer_config(self) -> dict:
        """The fixed config with every swept name (valued None): what a trainer whose Config
        depends on the sweep is asked about (:mod:`hpsweep.trainer.registry`'s hooks)."""
        return {**self.config, **{n: None for n in self.swept_names() if n not in self.config}}

    def swept_names(self) -> list[str]:
        """Every parameter name the sweep varies, in declaration order."""
        names = list(self.parameters)
        for variant in self.variants:
            names += [k for k in variant if k not in names]
        return names


def _raise(message: str):
    raise ValueError(message)


# --- errors --------------------------------------------------------------------------------

_TAGS = set(KINDS) | {"value", "fifo", "asha"}


def _field_names(model: Any, loc: tuple) -> list[str]:
    """The field names of the model found at ``loc`` below SweepSpec, for 'did you mean'."""
    current: Any = SweepSpec
    for part in loc:
        if part in ("fifo", "asha"):
            current = {"fifo": Fifo, "asha": Asha}[part]
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            if isinstance(part, str) and part in current.model_fields:
                current = current.model_fields[part].annotation
                continue
            return []
        current = _unwrap(current, part)
        if current is None:
            return []
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _unwrap(tp: Any, part: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        return _unwrap(args[0], part)
    if origin in (list, dict):
        inner = args[-1]
        return _unwrap(inner, None) if part is not None and typing.get_origin(inner) in (Union, Annotated) \
            else inner
    if origin is Union:
        for arg in args:
            found = arg if isinstance(arg, type) and issubclass(arg, BaseModel) else None
            if typing.get_origin(arg) is Annotated:
                inner, *meta = typing.get_args(arg)
                if any(isinstance(m, Tag) and m.tag == part for m in meta):
                    return inner
            if found is not None and part is None:
                return found
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else tp
    return tp if part is None else None


def _message(err: dict, raw_loc: tuple) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        names = _field_names(SweepSpec, raw_loc[:-1])
        close = difflib.get_close_matches(str(raw_loc[-1]), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else (
            f" (known keys: {', '.join(names)})" if names else "")
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing"
    if kind == "too_short" and raw_loc and raw_loc[-1] in KINDS:
        return f"{raw_loc[-1]} needs at least one value, got an empty list"
    if kind == "union_tag_invalid" and raw_loc and raw_loc[-1] == "scheduler":
        return "type must be 'fifo' or 'asha'"
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if "got" not in msg and "input" in err and kind != "domain" \
            and not isinstance(err["input"], (dict, list)):
        msg += f", got {err['input']!r}"
    return msg


def _clean_loc(loc: tuple) -> tuple:
    out = []
    for i, part in enumerate(loc):
        if part in _TAGS and i > 0 and not (isinstance(loc[i - 1], str) and loc[i - 1] in ("config",)):
            # A discriminator tag pydantic inserts into the location: not a key of the file,
            # except where the tag is the user's own key ({pow10: [...]}).
            if i + 1 < len(loc) and loc[i + 1] == part:
                continue
            if part in ("fifo", "asha", "value"):
                continue
        out.append(part)
    return tuple(out)


# --- loading -------------------------------------------------------------------------------

def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Read, parse and validate a sweep file, with ``overrides`` (``FIELD=VALUE``, see
    :mod:`hpsweep.spec.overrides`) applied first; raise :class:`SpecError` with every problem."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(source, [Problem(None, "", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(source, [Problem(None, "", f"cannot read the file: {exc}")]) from None
    return load_spec_text(text, source, path.parent, overrides)


def load_spec_text(text: str, source: str = "<sweep>", base_dir: str | Path | None = None,
                   overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Like :func:`load_spec` for YAML text; ``source`` names it in messages; relative data
    paths resolve under ``base_dir`` (default: the current directory) or the data root."""
    parsed = _overrides.parse_overrides(overrides)  # a malformed --set: UsageError
    loaded = load_yaml_text(text)
    problems = [Problem(p.line, p.path, p.message) for p in loaded.problems]
    if problems and loaded.data is None:
        raise SpecError(source, problems)
    set_problems, touched = _overrides.apply_overrides(loaded, parsed, _defaults())
    try:
        spec = _validate(loaded, problems + set_problems, source, base_dir)
    except SpecError as exc:
        raise SpecError(source, _overrides.attribute(exc.problems, touched)) from None
    spec._sources = _overrides.Sources(source, loaded, touched)
    return spec


def _defaults() -> dict[str, Any]:
    """Each top-level key of a sweep file and its default as plain data (None: required)."""
    out: dict[str, Any] = {}
    for name, field in SweepSpec.model_fields.items():
        value = None if field.is_required() else field.get_default(call_default_factory=True)
        out[name] = value.model_dump() if isinstance(value, BaseModel) else value
    return out


def _validate(loaded, problems: list[Problem], source: str, base_dir: str | Path | None) -> SweepSpec:
    if problems and loaded.data is None:
        raise SpecError(source, problems)
    data = loaded.data
    if data is None:
        raise SpecError(source, [Problem(None, "", "the file is empty; a sweep needs at least name, "
                                                   "trainer and metric (see sweeps/README.md)")])
    if not isinstance(data, dict):
        raise SpecError(source, [Problem(loaded.line_of(()), "",
                                         f"a sweep file must be a mapping of keys, got a {type(data).__name__}")])
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _clean_loc(tuple(err["loc"]))
            problems.append(Problem(loaded.line_of(loc), ".".join(map(str, loc)),
                                    _message(err, tuple(err["loc"]))))
        # every problem at once: the trainer and the metric are checked even so
        problems += [p for p in check_raw_against_trainer(data, loaded, base_dir)
                     if p.path not in {q.path for q in problems}]
        raise SpecError(source, problems) from None
    spec._base_dir = Path(base_dir) if base_dir is not None else None
    problems += check_against_trainer(spec, loaded)
    if spec.requirements is not None:
        spec._requirements_line = loaded.line_of(("requirements",))
        spec._requirements, messages = requirements.parse(spec.requirements, Path(spec.trainer_base()))
        problems += [Problem(spec._requirements_line, "requirements", m) for m in messages]
    if problems:
        raise SpecError(source, problems)
    return spec


def json_schema() -> dict:
    """The JSON Schema of the sweep YAML, for editors (``hpsweep schema``)."""
    schema = SweepSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "hpsweep sweep file"
    return schema
