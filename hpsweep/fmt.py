"""The one way hpsweep writes a value for a person to read (tables, labels, reports).

Dependency-free on purpose: :mod:`hpsweep.spec.plan` (cell labels) and every view import it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["fmt_value"]


def fmt_value(v: Any, digits: int = 4) -> str:
    """``v`` as shown: floats with ``digits`` significant digits, None as an empty string,
    anything else as ``str``."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)
