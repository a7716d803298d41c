"""Build a trainer's frozen ``Config`` dataclass from a mapping, collecting every problem.

Validation is pydantic's: a ``TypeAdapter`` over the trainer's own frozen dataclass, strict
(no ``"1"`` for an int, no ``2.5`` or ``true`` for an int, no number for a string; an int is
a number for a float field) with unknown keys forbidden. The values are handed to it as JSON,
which is what a sweep's values are (YAML data), so that its strict mode accepts a list for a
tuple field and an int for a float one, as a JSON document would. Every wrong-typed field is
reported in one pass; the dataclass's ``__post_init__`` (its invariants, raising
``ValueError``) runs once the types are right.

Used by the sweep spec (each distinct resolved config is validated once, in the planning
process, see :mod:`hpsweep.spec.points`) and by the standalone command line
(``python -m trainers.snap key=value ...``, which parses its text with :func:`parse_text`
first). :func:`trusted` makes the dataclass from a config already validated, without checking
the types again (the trial does that).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["ConfigProblem", "STRICT", "adapter", "build_config", "config_fields", "parse_text",
           "trusted", "display_name", "DataPath", "OutputName", "path_fields"]

#: the pydantic settings of every trainer Config (set on the class by :func:`adapter`)
STRICT = {"strict": True, "extra": "forbid"}


@dataclasses.dataclass(frozen=True)
class ConfigProblem:
    field: str      # the offending key ("" for a problem of the whole config)
    message: str


class DataPath:
    """Marks a Config field as a location the trainer reads (``Annotated[str | None, DataPath]``):
    an absolute path or ``s3://`` URI as given, a relative path under the sweep file's directory
    or the data root (never climbing out of it), or ``output:NAME``, a file an earlier run wrote
    through ``run.output``. hpsweep checks these before launching; ``run.data_path`` resolves
    them. See :mod:`hpsweep.trainer.data`."""


class OutputName:
    """Marks a Config field as the name of an output the trainer writes through
    ``run.output(name)`` (``Annotated[str | None, OutputName]``): a relative name such as
    ``models/lstm.pt``, never a path; where it lands is the run's business."""


@functools.cache
def path_fields(config_cls: type) -> dict[str, type]:
    """Field name -> :class:`DataPath` or :class:`OutputName`, for the fields the Config marks."""
    hints = typing.get_type_hints(config_cls, include_extras=True)
    out: dict[str, type] = {}
    for f in dataclasses.fields(config_cls):
        for meta in getattr(hints[f.name], "__metadata__", ()):
            if meta in (DataPath, OutputName):
                out[f.name] = meta
    return out


@functools.cache
def config_fields(config_cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation (cached: resolving annotations is slow)."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


@functools.cache
def adapter(config_cls: type):
    """The pydantic ``TypeAdapter`` of a trainer's Config dataclass (strict, extra keys forbidden).

    A stdlib dataclass carries its pydantic settings in ``__pydantic_config__``; a Config that
    declares none gets :data:`STRICT`.
    """
    from pydantic import TypeAdapter

    if "__pydantic_config__" not in vars(config_cls):
        config_cls.__pydantic_config__ = dict(STRICT)
    return TypeAdapter(config_cls)


def display_name(config_cls: type) -> str:
    """``trainers.snap.Config`` for the class defined in ``trainers/snap/config.py``."""
    module = config_cls.__module__
    module = module[:-len(".config")] if module.endswith(".config") else module
    return f"{module}.{config_cls.__qualname__}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(_type_name(a) for a in args)
        return text + " or null" if len(args) < len(typing.get_args(tp)) else text
    if origin is tuple:
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


_TYPE_ERRORS = {"int_type", "int_parsing", "int_from_float", "float_type", "float_parsing",
                "bool_type", "bool_parsing", "string_type", "literal_error", "tuple_type",
                "list_type", "none_required", "finite_number"}


def _problems(config_cls: type, errors: list[dict]) -> list[ConfigProblem]:
    fields = config_fields(config_cls)
    problems: list[ConfigProblem] = []
    for err in errors:
        loc, kind = tuple(err["loc"]), err["type"]
        if not loc:  # __post_init__: an invariant of the whole config
            message = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            problems.append(ConfigProblem("", message))
            continue
        key = str(loc[0])
        if kind == "unexpected_keyword_argument" or key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(ConfigProblem(key, f"unknown option of {display_name(config_cls)}{hint}"))
        elif kind in ("missing_argument", "missing"):
            problems.append(ConfigProblem(key, "required option is missing"))
        elif len(loc) == 1 and kind in _TYPE_ERRORS:
            problems.append(ConfigProblem(key, f"must be {_type_name(fields[key])}, got {err['input']!r}"))
        else:
            where = "".join(f"[{p}]" for p in loc[1:])
            problems.append(ConfigProblem(key, f"{where}: {err['msg']}, got {err.get('input')!r}"
                                          if where else f"{err['msg']}, got {err.get('input')!r}"))
    # one message per field (a union reports each of its members)
    return list({(p.field, p.message): p for p in problems}.values())


def build_config(config_cls: type, values: Mapping[str, Any]) -> tuple[Any | None, list[ConfigProblem]]:
    """Make ``config_cls(**values)`` with every problem collected.

    Returns ``(config, [])`` or ``(None, problems)``: unknown keys (with the closest field
    name), values of the wrong type (all of them at once), and the ``ValueError`` the
    dataclass's own ``__post_init__`` raises for a broken invariant.
    """
    from pydantic import ValidationError

    try:
        text = json.dumps(dict(values), default=str)
    except ValueError as exc:  # a circular structure: cannot come from YAML
        return None, [ConfigProblem("", str(exc))]
    try:
        return adapter(config_cls).validate_json(text), []
    except ValidationError as exc:
        problems = _problems(config_cls, exc.errors(include_url=False))
    except TypeError as exc:  # a __post_init__ that trips over a value it did not expect
        return None, [ConfigProblem("", str(exc))]
    # Values of the wrong type stop validation before the Config's own invariants run: run them
    # again without those values (their defaults instead), so every problem comes at once.
    bad = {p.field for p in problems if p.field}
    rest = {k: v for k, v in values.items() if k not in bad}
    if bad and len(rest) < len(values):
        try:
            adapter(config_cls).validate_json(json.dumps(rest, default=str))
        except ValidationError as exc:
            problems += [p for p in _problems(config_cls, exc.errors(include_url=False))
                         if p not in problems and p.field not in bad]
        except TypeError:
            pass
    return None, problems


def trusted(config_cls: type, config: Mapping[str, Any]) -> Any:
    """The Config of a resolved config already validated by :func:`build_config` (the planner
    did; a trial trusts it): lists back to tuples where the field is a tuple, no type checks."""
    fields = config_fields(config_cls)
    kwargs = {k: tuple(v) if isinstance(v, list) and typing.get_origin(fields[k]) is tuple else v
              for k, v in config.items()}
    return config_cls(**kwargs)


def parse_text(text: str) -> Any:
    """A command-line value: YAML scalars and flow lists (``3``, ``1e-3``, ``true``, ``[1,2]``)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
