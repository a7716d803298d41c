"""The command trainer's configuration: the program, how values reach it, how metrics come back.

No torch, Ray or MLflow: validating a sweep imports this module alone. Every name in a sweep's
``config`` or ``parameters`` that is not one of the fields below is a value for the program
(:func:`config_class` adds a field for each), passed as ``--name value`` (or through ``args``),
with the cell's ``seed``. The metrics a sweep may name come from the patterns
(:func:`metrics_of`); :func:`problems` checks what needs the sweep file's directory.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shlex
import shutil
import string
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from hpsweep.trainer.config import DataPath
from hpsweep.trainer.data import relocate

__all__ = ["Config", "METRICS", "DEFAULT_ARGS", "PYTHON", "config_class", "metrics_of", "problems",
           "declared", "program_values", "argv", "resolve_program", "value_text"]

#: with the default patterns (``name=value`` and ``name: value`` pairs) any name may come back
METRICS = ("*",)
#: how each value reaches the program unless ``args`` says otherwise
DEFAULT_ARGS = "--{name} {value}"
#: a ``command`` element that stands for the Python interpreter hpsweep runs under (W&B's
#: ``${interpreter}``): ``[ "{python}", train.py ]`` runs the script with the sweep's Python
PYTHON = "{python}"


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    #: the program and its fixed arguments (an argv list, or one string split like a shell does)
    command: str | tuple[str, ...] = ()
    #: how values reach the program: a template applied to each value (``--{name} {value}``,
    #: ``{name}={value}`` for Hydra), or the whole argument list with ``{name}`` placeholders
    args: str | tuple[str, ...] = DEFAULT_ARGS
    #: regular expressions whose named groups are metrics (a ``step`` group is the step); None:
    #: ``name=value`` / ``name: value`` pairs; []: none read from the output (JSON lines only)
    metrics: tuple[str, ...] | None = None
    #: the directory the program runs from (each cell sees it from a directory of its own):
    #: relative to the sweep file's directory, or absolute
    workdir: Annotated[str, DataPath] = "."
    #: seconds between SIGTERM and SIGKILL when a cell is cancelled
    grace: float = 10.0

    def __post_init__(self) -> None:
        if not self.argv_head():
            raise ValueError("command is required: the program to run and its fixed arguments, "
                             "e.g. command: [python3, train.py]")
        if self.grace < 0:
            raise ValueError(f"grace must be >= 0 seconds, got grace={self.grace}")
        names = {f.name for f in dataclasses.fields(self)} - set(OWN)
        errors = [message for _, message in _errors(self.metrics, self.args, names)]
        if errors:
            raise ValueError("; ".join(errors))

    def argv_head(self) -> list[str]:
        return shlex.split(self.command) if isinstance(self.command, str) else list(self.command)


def _errors(metrics, args, names) -> list[tuple[str, str]]:
    """``(field, problem)`` of the patterns and the argument template."""
    errors: list[tuple[str, str]] = []
    if isinstance(metrics, (list, tuple)):
        for i, pattern in enumerate(metrics):
            try:
                compiled = re.compile(pattern)
            except (re.error, TypeError) as exc:
                errors.append(("metrics", f"metrics[{i}] {pattern!r} does not compile: {exc}"))
                continue
            if not set(compiled.groupindex) - {"step"}:
                errors.append(("metrics", f"metrics[{i}] {pattern!r} names no metric: give a named "
                                          r"group, e.g. 'loss (?P<loss>[0-9.eE+-]+)'"))
    if isinstance(args, str):
        fields = _placeholders(args)
        if fields is None or "value" not in fields or fields - {"name", "value"}:
            errors.append(("args", f"args {args!r}: a template for each value takes {{name}} and "
                                   "{value} (e.g. '--{name} {value}', '{name}={value}'), or give a list"))
    elif isinstance(args, (list, tuple)):
        for item in args:
            fields = _placeholders(str(item))
            unknown = sorted(fields - names) if fields is not None else [str(item)]
            if unknown:
                errors.append(("args", f"args {item!r}: {', '.join(map(repr, unknown))} is not a value "
                                       f"of this sweep (values: {', '.join(sorted(names))}, and "
                                       "{{ for a brace)"))
    return errors


#: the command trainer's own fields: every other field is a value for the program
OWN = ("command", "args", "metrics", "workdir", "grace")


def _placeholders(text: str) -> set[str] | None:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError:
        return None


@functools.cache
def _with_values(names: frozenset[str]) -> type:
    extra = [(n, Any, dataclasses.field(default=None)) for n in sorted(names)]
    cls = dataclasses.make_dataclass("Config", extra, bases=(Config,), frozen=True,
                                     namespace={"__module__": __name__})
    cls.__qualname__ = "Config"
    return cls


def config_class(config: Mapping[str, Any]) -> type:
    """The Config of a sweep or cell whose config names ``config``'s keys: :class:`Config` plus
    one field (any value) for each name that is not its own."""
    own = {f.name for f in dataclasses.fields(Config)}
    names = frozenset(k for k in config if k not in own)
    return _with_values(names) if names else Config


def declared(patterns) -> tuple[str, ...]:
    """The metric names patterns declare (their named groups but ``step``), in order."""
    out: dict[str, None] = {}
    for pattern in patterns or ():
        with_groups = re.compile(pattern).groupindex
        out.update((g, None) for g in with_groups if g != "step")
    return tuple(out)


def metrics_of(config: Mapping[str, Any]) -> tuple[str, ...]:
    """What a sweep with this fixed config may name as its metric: the patterns' named groups,
    or anything (``*``) with the default pairs or JSON lines only."""
    patterns = config.get("metrics")
    names: tuple[str, ...] = ()
    for pattern in patterns if isinstance(patterns, (list, tuple)) else ():
        try:
            names += tuple(n for n in declared([pattern]) if n not in names)
        except (re.error, TypeError):
            continue   # the Config check reports it
    return names or METRICS


def program_values(config) -> dict[str, Any]:
    """The values the program gets: every field but the command trainer's own, seed last."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name not in OWN and f.name != "seed"}
    values["seed"] = config.seed
    return values


def value_text(value: Any) -> str:
    """A value as the program reads it: numbers as Python writes them, true/false, lists as JSON."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def argv(config, program: str) -> list[str]:
    """The program's whole argument list for one cell (``program``: the resolved first element)."""
    head = [program] + [sys.executable if a == PYTHON else a for a in config.argv_head()[1:]]
    values = program_values(config)
    if isinstance(config.args, str):
        template = shlex.split(config.args)
        tail = [t.format(name=name, value=value_text(value))
                for name, value in values.items() if value is not None for t in template]
    else:
        texts = {k: value_text(v) for k, v in values.items()}
        tail = [item.format_map(texts) for item in config.args]
    return head + tail


def resolve_program(first: str, source: Path) -> str | None:
    """The executable ``first`` names: ``{python}``, a path (relative to the source directory)
    or a name on ``PATH``; None when there is none."""
    if first == PYTHON:
        return sys.executable
    if "/" in first:
        path = Path(relocate(os.path.expanduser(first)))
        path = path if path.is_absolute() else source / path
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    return shutil.which(first)


def problems(config: Mapping[str, Any], bases: list[Path], names=()) -> list[tuple[str, str]]:
    """What a sweep's fixed command config gets wrong, as ``(field, problem)``: the program (it
    needs the sweep file's directory), and the patterns and the template (``names``: the
    program's values), so that they come with the sweep's other problems."""
    own = {f.name for f in dataclasses.fields(Config)}
    values = set(names or config) - own | {"seed"}
    found = _errors(config.get("metrics"), config.get("args", DEFAULT_ARGS), values)
    return found + _program_problems(config, bases)


def _program_problems(config: Mapping[str, Any], bases: list[Path]) -> list[tuple[str, str]]:
    command = config.get("command")
    if not command:
        return []
    try:
        head = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
    except ValueError as exc:
        return [("command", f"cannot split {command!r}: {exc}")]
    if not head:
        return []
    workdir = str(config.get("workdir") or ".")
    source = Path(relocate(os.path.expanduser(workdir)))
    if not source.is_absolute():
        source = next((Path(b) / workdir for b in bases if (Path(b) / workdir).is_dir()), Path(bases[0]) / workdir)
    if resolve_program(head[0], source) is not None:
        return []
    if "/" in head[0]:
        path = Path(relocate(os.path.expanduser(head[0])))
        path = path if path.is_absolute() else source / path
        why = "is not executable (chmod +x it, or run it through its interpreter)" if path.is_file() else \
            f"does not exist (looked in {source})"
        return [("command", f"{head[0]!r} {why}")]
    return [("command", f"{head[0]!r} is not a program on PATH (give its path, or {PYTHON} for "
                        "the Python hpsweep runs under)")]
