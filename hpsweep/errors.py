"""Errors meant for the user: the CLI prints them without a traceback and exits with 2."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A problem with the user's input (a file, a flag, an address): message only, exit code 2."""

    exit_code = 2
