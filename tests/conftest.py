"""The test suite reads the real data sets in ``../shared/data`` (MNIST, the Brown corpus,
Wikipedia text): the data root is pointed there explicitly, for the tests and every process
they start (a user's data root defaults to the sweep file's directory instead)."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

os.environ.setdefault("HPSWEEP_DATA_ROOT", str(SHARED_DATA))


def _staged() -> set[Path]:
    import tempfile

    return set(Path(tempfile.gettempdir()).glob("hpsweep-job-*"))


def pytest_sessionstart(session) -> None:
    session.config._hpsweep_staged = _staged()


def pytest_sessionfinish(session, exitstatus) -> None:
    """The copies ``build_submission`` stages for a job (``submit`` removes its own once sent;
    tests that only build one leave it): removed with the session."""
    import shutil

    for path in _staged() - getattr(session.config, "_hpsweep_staged", set()):
        shutil.rmtree(path, ignore_errors=True)
