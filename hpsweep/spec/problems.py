"""A sweep file's problems: each with its line and field path, all of them raised at once."""

from __future__ import annotations

import typing

from hpsweep.errors import UserError

__all__ = ["Problem", "SpecError"]


class Problem(typing.NamedTuple):
    line: int | None
    path: str
    message: str
    origin: str = ""      # a command-line override (``--set FIELD=VALUE``) the problem is of


class SpecError(UserError):
    """Every problem of one sweep file, one per line."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.path))
        super().__init__("\n".join(self.format(p) for p in self.problems))

    def format(self, p: Problem) -> str:
        if p.origin:
            return f"{p.origin} ({self.source}): {p.path}: {p.message}"
        where = f"{self.source}:{p.line}" if p.line else self.source
        return f"{where}: {p.path}: {p.message}" if p.path else f"{where}: {p.message}"
