"""The one way hpsweep writes a value for a person to read (tables, labels, reports).

Dependency-free on purpose: :mod:`hpsweep.spec.plan` (cell labels) and every view import it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["fmt_value", "fmt_param", "fmt_params", "PARAM_DIGITS"]

#: significant digits of a parameter value, everywhere (CLI tables, the report, figure labels):
#: enough that 10^-2.5 = 0.00316228 stays apart from its neighbours in a pow10 grid
PARAM_DIGITS = 6


def fmt_value(v: Any, digits: int = 4) -> str:
    """``v`` as shown: floats with ``digits`` significant digits, None as an empty string,
    anything else as ``str``."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def fmt_param(v: Any) -> str:
    """A parameter's value as every table and label shows it (:data:`PARAM_DIGITS` digits)."""
    return fmt_value(v, PARAM_DIGITS)


def fmt_params(params: dict, sep: str = " ") -> str:
    """Swept values as a cell's label writes them, ``lr=0.00316228 hidden=64``: the live lines,
    ``status``, ``results`` and the report all show a parameter with the same digits."""
    return sep.join(f"{k}={fmt_param(v)}" for k, v in params.items())
