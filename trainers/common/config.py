"""Build a trainer's frozen ``Config`` dataclass from a mapping, collecting every problem.

Used by the sweep spec (every cell's resolved config is checked before anything is launched)
and by the standalone command line (``python -m trainers.snap key=value ...``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["ConfigProblem", "build_config", "config_fields", "coerce", "parse_text"]


@dataclasses.dataclass(frozen=True)
class ConfigProblem:
    field: str      # the offending key ("" for a problem of the whole config)
    message: str


@functools.cache
def config_fields(config_cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation (cached: resolving annotations is slow)."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list"
    return getattr(tp, "__name__", str(tp))


def parse_text(text: str) -> Any:
    """A command-line value: YAML scalars and flow lists (``3``, ``1e-3``, ``true``, ``[1,2]``)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise ``TypeError`` with a readable reason.

    Strict on purpose: no float -> int truncation, no string -> number guessing (the command
    line parses its text with :func:`parse_text` first), bools are not ints.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError(f"must be {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except TypeError:
                pass
        raise TypeError(f"must be {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"must be a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0]) for v in value)
        if len(args) != len(value):
            raise TypeError(f"must be a list of {len(args)} items, got {value!r}")
        return tuple(coerce(v, a) for v, a in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"must be a string, got {value!r}")
    return value


def build_config(config_cls: type, values: Mapping[str, Any]) -> tuple[Any | None, list[ConfigProblem]]:
    """Make ``config_cls(**values)`` with every problem collected.

    Returns ``(config, [])`` or ``(None, problems)``: unknown keys (with the closest field
    name), values of the wrong type, and the ``ValueError`` the dataclass's own
    ``__post_init__`` raises for a broken invariant.
    """
    fields = config_fields(config_cls)
    problems: list[ConfigProblem] = []
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"{config_cls.__module__}.{config_cls.__qualname__}"
            problems.append(ConfigProblem(key, f"unknown option of {where}{hint}"))
            continue
        try:
            kwargs[key] = coerce(value, fields[key])
        except TypeError as exc:
            problems.append(ConfigProblem(key, str(exc)))
    if problems:
        return None, problems
    try:
        return config_cls(**kwargs), []
    except (ValueError, TypeError) as exc:
        return None, [ConfigProblem("", str(exc))]
