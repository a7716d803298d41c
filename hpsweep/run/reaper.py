"""The embedded Ray ends with the driver that started it, however the driver ends.

``hpsweep run`` without ``--address`` starts Ray inside the driver. When the driver exits,
``ray.shutdown`` stops Ray's processes; when it is killed (SIGKILL, the OOM killer), Ray's GCS
and raylet go with it but its dashboard and runtime-env agents and busy workers linger for
minutes, holding ports and memory. :func:`watch` starts a small process, in a session of its
own (a Ctrl-C to the terminal does not reach it), that waits for the driver to end and then
stops every process still writing into that Ray session's directory. Ray renames its
processes (``ray::DashboardAgent``), so they are found by their open files, not their names.

It is started *before* ``ray.init`` (a Ctrl-C while Ray starts up left its agents alive for
about a minute when it came after): it is given Ray's temporary root, not the session, and
finds the session there by name: Ray names the session a driver starts
``session_<date>_<pid of that driver>``.

Linux only (``/proc``); elsewhere :func:`watch` does nothing. It imports only the standard
library: the watcher costs one small Python process per sweep.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

__all__ = ["watch", "session_processes", "sessions_of"]

_GRACE_S = 3.0  # between SIGTERM and SIGKILL


def watch(temp_root: str) -> subprocess.Popen | None:
    """Start the watcher for this process and the Ray session it starts under ``temp_root``
    (Ray's temporary root: ``$RAY_TMPDIR/ray`` by default)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "hpsweep.run.reaper", str(os.getpid()), temp_root],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True)


def _is_ray(pid: str) -> bool:
    """Ray's own processes: renamed ``ray::…`` (workers, agents) or run from Ray's package
    (``gcs_server``, ``raylet``, the log monitor). A person's ``tail -f`` of a log is not."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return argv[0].startswith(b"ray::") or any(b"/ray/" in a for a in argv[:2])


def session_processes(session_dir: str, exclude: int | None = None) -> list[int]:
    """Every Ray process with a file open under ``session_dir`` (its logs, its sockets)."""
    prefix = os.path.realpath(session_dir).rstrip("/") + "/"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (os.getpid(), exclude) or not _is_ray(name):
            continue
        fd_dir = f"/proc/{name}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}").startswith(prefix):
                        found.append(int(name))
                        break
    return found


def _wait_for_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd (old kernel): poll
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(1.0)
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def sessions_of(temp_root: str, pid: int) -> list[str]:
    """The Ray sessions that process ``pid`` started under ``temp_root``."""
    with contextlib.suppress(OSError):
        return [os.path.join(temp_root, n) for n in os.listdir(temp_root)
                if n.startswith("session_") and n.endswith(f"_{pid}")
                and not os.path.islink(os.path.join(temp_root, n))]
    return []


def _left(temp_root: str, pid: int) -> list[int]:
    return sorted({p for s in sessions_of(temp_root, pid) for p in session_processes(s, exclude=pid)})


def main(argv: list[str]) -> int:
    pid, temp_root = int(argv[0]), argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _wait_for_exit(pid)
    for _ in range(2):   # again once: a process Ray was starting as its driver ended
        left = _left(temp_root, pid)
        if left:
            _signal_all(left, signal.SIGTERM)
            deadline = time.monotonic() + _GRACE_S
            while left and time.monotonic() < deadline:
                time.sleep(0.2)
                left = _left(temp_root, pid)
            _signal_all(left, signal.SIGKILL)
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
