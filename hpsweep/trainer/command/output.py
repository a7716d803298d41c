"""Metrics from a program's output: lines matched against patterns, and JSON lines from a file.

A pattern is a regular expression; each named group but ``step`` is a metric, whose value is
the text it matched read as a number. Without patterns, ``name=value`` and ``name: value`` pairs
are metrics (``step=N`` is the step). A metric's step is the ``step`` of its line when there is
one, else how many times its pattern (or, for pairs, its name) has matched so far, counted
across attempts (the counts ride in the checkpoint). Each line costs a dictionary lookup and a
regular expression search or two: about a microsecond a line that carries nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator

__all__ = ["LineParser", "JsonLines", "PAIR"]

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)"
#: the default: ``loss=0.25``, ``acc: 0.9``, ``val/loss = 1e-3``; a name starts with a letter,
#: and a value ends the pair (``12:30:01`` is no pair)
PAIR = re.compile(rf"(?P<name>[A-Za-z_][\w./-]*)\s*[=:]\s*(?P<value>{_NUMBER})(?![\w.:])")
#: what every pair has: a line without it is passed over at the cost of one short search
_MAYBE = re.compile(r"[=:]\s*(?:[-+.\d]|nan|inf)")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value


class LineParser:
    """One output line at a time -> ``(step, {metric: value})`` reports."""

    def __init__(self, patterns: tuple[str, ...] | None, counts: dict[str, int] | None = None) -> None:
        self.pairs = patterns is None
        self.patterns = [(f"pattern{i}", re.compile(p)) for i, p in enumerate(patterns or ())]
        self.counts: dict[str, int] = dict(counts or {})
        self.seen: set[str] = set()

    def parse(self, line: str) -> Iterator[tuple[int, dict[str, float]]]:
        if self.pairs:
            yield from self._pairs(line)
            return
        for key, pattern in self.patterns:
            match = pattern.search(line)
            if match is None:
                continue
            groups = match.groupdict()
            values = {}
            for name, text in groups.items():
                if name != "step" and text is not None and (v := _number(text)) is not None:
                    values[name] = v
            if not values:
                continue
            step = self._step(groups.get("step"), key)
            self.seen.update(values)
            yield step, values

    def _pairs(self, line: str) -> Iterator[tuple[int, dict[str, float]]]:
        if _MAYBE.search(line) is None:
            return
        found = {m.group("name"): m.group("value") for m in PAIR.finditer(line)}
        if not found:
            return
        explicit = found.pop("step", None)
        by_step: dict[int, dict[str, float]] = {}
        for name, text in found.items():
            value = float(text)
            step = self._step(explicit, name)
            by_step.setdefault(step, {})[name] = value
            self.seen.add(name)
        yield from by_step.items()

    def _step(self, explicit: str | None, key: str) -> int:
        count = self.counts.get(key, 0) + 1
        self.counts[key] = count
        if explicit is not None:
            value = _number(explicit)
            if value is not None and math.isfinite(value):
                return int(value)
        return count


class JsonLines:
    """The metrics file a program appends JSON lines to (``{"step": 3, "loss": 0.5}``), read as
    it grows: whole lines only, numbers only; a line without ``step`` counts as the next."""

    def __init__(self, path: str, count: int = 0) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""
        self.count = count
        self.seen: set[str] = set()
        self.bad: list[str] = []

    def read(self, last: bool = False) -> Iterator[tuple[int, dict[str, float]]]:
        """The reports of the lines appended since; ``last``: at the program's end, a last line
        without its newline too."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = b"" if last else lines.pop()
        for raw in lines:
            report = self._row(raw)
            if report is not None:
                yield report

    def _row(self, raw: bytes) -> tuple[int, dict[str, float]] | None:
        if not raw.strip():
            return None
        try:
            row = json.loads(raw)
        except ValueError:
            if len(self.bad) < 3:
                self.bad.append(raw[:200].decode("utf-8", "replace"))
            return None
        if not isinstance(row, dict):
            return None
        self.count += 1
        step = row.pop("step", None)
        values = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not values:
            return None
        self.seen.update(values)
        explicit = isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step)
        return (int(step) if explicit else self.count), values
