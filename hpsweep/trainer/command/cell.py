"""A command cell's directories: the working directory in which the program's source directory
is visible, its checkpoint directory, and the checkpoint directory as checkpoint state.

The working directory mirrors the source: a real directory for each of the source's
directories and a symbolic link for each file, so that every relative read finds the source's
file while every file the program creates by a relative path (``model.pt``,
``checkpoints/last.pt``, even inside a directory the source has) is the cell's own. A file the
source already has is a link: writing it in place (opening it for writing) writes the source,
as running the program there would; replacing it (write elsewhere, then rename over it) does
not. Mirroring stops at :data:`MIRROR_LIMIT` entries; deeper directories are linked whole
(a large data set is read through one link). Hidden directories (``.git``, ``.hpsweep``: the
sweep's own store) are linked, never mirrored, and ``.hpsweep`` not at all.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["mirror", "CheckpointDir", "MIRROR_LIMIT"]

MIRROR_LIMIT = 5000
_SKIP = {".hpsweep", "__pycache__"}


def mirror(source: Path, target: Path, limit: int = MIRROR_LIMIT) -> int:
    """Make ``target`` (an empty directory) show ``source`` as described above; returns the
    entries made. Breadth first, so that a budget runs out in the deepest directories."""
    made = 0
    queue = [(source, target)]
    while queue:
        src, dst = queue.pop(0)
        try:
            entries = list(os.scandir(src))
        except OSError:
            continue
        for entry in entries:
            if entry.name in _SKIP:
                continue
            link = os.path.join(dst, entry.name)
            made += 1
            if entry.is_dir(follow_symlinks=True) and not entry.name.startswith(".") and made < limit:
                os.mkdir(link)
                queue.append((Path(entry.path), Path(link)))
            else:
                os.symlink(entry.path, link)
    return made


class CheckpointDir:
    """``HPSWEEP_CHECKPOINT_DIR``: restored from a checkpoint state, and turned into one when
    its files changed (their names, sizes and modification times)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.signature = self._signature()

    def _signature(self) -> tuple:
        out = []
        for root, dirs, files in os.walk(self.path):
            dirs.sort()
            for name in sorted(files):
                try:
                    st = os.stat(os.path.join(root, name))
                except OSError:
                    continue
                out.append((os.path.relpath(os.path.join(root, name), self.path), st.st_size, st.st_mtime_ns))
            if not files and not dirs:
                out.append((os.path.relpath(root, self.path), -1, 0))
        return tuple(out)

    def restore(self, files: dict[str, bytes]) -> None:
        for rel, data in files.items():
            target = self.path / rel
            if data is None:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        self.signature = self._signature()

    def changed(self) -> bool:
        return self._signature() != self.signature

    def snapshot(self) -> dict[str, bytes | None]:
        """The directory's files (an empty directory as None), and the signature it had: a
        file the program replaces while this reads it is read again next time."""
        signature = self._signature()
        files: dict[str, bytes | None] = {}
        for rel, size, _ in signature:
            path = self.path / rel
            if size < 0:
                files[rel] = None
                continue
            try:
                files[rel] = path.read_bytes()
            except OSError:
                continue   # removed meanwhile
        self.signature = signature
        return files

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
