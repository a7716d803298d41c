"""The test suite reads the real data sets in ``../shared/data`` (MNIST, the Brown corpus,
Wikipedia text): the data root is pointed there explicitly, for the tests and every process
they start (a user's data root defaults to the sweep file's directory instead)."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

os.environ.setdefault("HPSWEEP_DATA_ROOT", str(SHARED_DATA))
