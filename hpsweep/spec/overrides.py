"""``--set FIELD=VALUE``: a sweep file's fields overridden from the command line.

An override replaces one value of the parsed YAML before the sweep is validated, so it is
checked exactly as the file is (the models, the trainer's Config, the paths), and a problem it
causes names the override instead of a line of the file::

    --set config.steps=abc (sweeps/snap.copy.yaml): config.steps: ... got 'abc'

``FIELD`` is a dotted path into the file (``resources.gpus``, ``config.steps``,
``parameters.lr``, ``variants.0.method``: a number indexes a list); mappings it names that the
file lacks are made. ``VALUE`` is YAML, read as the file is read (``0``, ``abc``, ``[0, 1]``,
``{grid: [0.1, 0.01]}``). A cell is a hash of its resolved config, so an override of what a
trainer sees (config, parameters, seeds) makes other cells, which never mix with the file's.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from typing import Any

from hpsweep.errors import UsageError
from hpsweep.spec.problems import Problem
from hpsweep.spec.yamlload import LoadedYaml, load_yaml_text

__all__ = ["Override", "parse_overrides", "apply_overrides", "attribute", "Sources", "add_flag", "FLAG"]

FLAG = "--set"


@dataclasses.dataclass(frozen=True)
class Override:
    text: str          # as given: "config.steps=200"
    path: tuple        # ("config", "steps")
    value: Any

    @property
    def dotted(self) -> str:
        return ".".join(map(str, self.path))

    def __str__(self) -> str:
        return f"{FLAG} {self.text}"


def add_flag(parser: argparse.ArgumentParser) -> None:
    """``--set FIELD=VALUE`` (repeatable) on a command that reads sweep files."""
    parser.add_argument(FLAG, dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of the sweep file (YAML value; repeatable), e.g. "
                             "--set resources.gpus=0 --set config.steps=200 --set seeds=1")


def parse_overrides(texts: list[str] | tuple[str, ...]) -> list[Override]:
    """``FIELD=VALUE`` texts as overrides; :class:`UsageError` naming every malformed one."""
    out, bad = [], []
    for text in texts:
        field, eq, raw = text.partition("=")
        parts = tuple(p.strip() for p in field.split("."))
        if not eq or not field.strip() or any(not p for p in parts):
            bad.append(f"{FLAG} {text}: expected FIELD=VALUE with a dotted field, e.g. "
                       f"{FLAG} resources.gpus=0 or {FLAG} config.steps=200")
            continue
        loaded = load_yaml_text(raw)
        if loaded.problems:
            bad.append(f"{FLAG} {text}: the value is not YAML ({loaded.problems[0].message}); "
                       "quote it for the shell, e.g. --set 'parameters.lr={grid: [0.1, 0.01]}'")
            continue
        path = tuple(int(p) if p.isdigit() else p for p in parts)
        out.append(Override(text, path, loaded.data))
    if bad:
        raise UsageError("\n".join(bad))
    return out


def apply_overrides(loaded: LoadedYaml, overrides: list[Override], fields: dict[str, Any]) -> tuple[
        list[Problem], dict[str, Override]]:
    """Set each override's value in ``loaded.data`` (in order: a later one wins). Returns the
    problems of paths that cannot be set (each naming its override), and, by dotted path, the
    override behind every path it set or made (for :func:`attribute`). ``fields``: the sweep
    file's top-level keys and their defaults as plain data (None for a required key), for 'did
    you mean' and for a path through a key the file leaves out."""
    problems: list[Problem] = []
    touched: dict[str, Override] = {}
    if overrides and loaded.data is None:
        loaded.data = {}
    for o in overrides:
        if not isinstance(loaded.data, dict):
            break  # the file itself is not a mapping: reported by the loader
        top = o.path[0]
        if top not in fields:
            close = difflib.get_close_matches(str(top), fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(fields)}"
            problems.append(Problem(None, str(top), f"unknown key ({hint})", str(o)))
            continue
        default = fields[top]
        if len(o.path) > 1 and top not in loaded.data and default is not None \
                and not isinstance(default, (dict, list)):
            problems.append(Problem(None, str(top), f"{top} is {default!r} (its default), not a mapping: "
                                    f"set {top} itself", str(o)))
            continue
        node: Any = loaded.data
        made: list[str] = []
        for i, key in enumerate(o.path):
            here = ".".join(map(str, o.path[:i + 1]))
            last = i == len(o.path) - 1
            if isinstance(node, list):
                if not isinstance(key, int) or not 0 <= key < len(node):
                    above = ".".join(map(str, o.path[:i]))
                    has = (f"a list of {len(node)}: give an index from 0 to {len(node) - 1}" if node
                           else f"an empty list: set {above} itself")
                    problems.append(Problem(None, here, f"{above} is {has}", str(o)))
                    break
            elif isinstance(node, dict):
                if key not in node and not last:
                    node[key] = [] if i == 0 and isinstance(default, list) else {}
                    made.append(here)
            else:
                above = ".".join(map(str, o.path[:i]))
                problems.append(Problem(None, here, f"{above} is {node!r}, not a mapping: set {above} "
                                        "itself", str(o)))
                break
            if last:
                node[key] = o.value
                touched[here] = o
                touched.update({m: o for m in made})
            else:
                node = node[key]
    return problems, touched


def attribute(problems: list[Problem], touched: dict[str, Override]) -> list[Problem]:
    """Problems at (or below) a path an override set, or at a mapping it made, named after that
    override instead of a line of the file."""
    if not touched:
        return problems
    out = []
    for p in problems:
        owner = touched.get(p.path) or next(
            (o for path, o in touched.items() if p.path.startswith(path + ".") and path == o.dotted), None)
        out.append(p._replace(line=None, origin=str(owner)) if owner is not None and not p.origin else p)
    return out


class Sources:
    """Where a field of a loaded sweep came from: ``FILE:LINE`` of the file, or the override
    that set it (for messages about values checked after loading, e.g. resources)."""

    def __init__(self, source: str, loaded: LoadedYaml, touched: dict[str, Override]) -> None:
        self.source, self.lines, self.touched = source, loaded, touched

    def where(self, *path) -> str:
        dotted = ".".join(map(str, path))
        for here, o in self.touched.items():
            if dotted == here or dotted.startswith(here + "."):
                return str(o)
        line = self.lines.lines.get(tuple(path))
        return f"{self.source}:{line}" if line else f"{self.source} (default)"

    def overridden(self) -> list[str]:
        """The overrides applied, as given (``FIELD=VALUE``), in order."""
        return list(dict.fromkeys(o.text for o in self.touched.values()))
