"""The program's process: started in a process group of its own, stopped as a group, and never
left behind, even when the process that started it is killed with SIGKILL.

Stopping: SIGTERM to the group, then SIGKILL to what is left after the grace period. A program
that leaves its group (``setsid``, a daemon) is beyond reach, as under any process manager.

Never left behind: a watcher process (one per worker process, started with the first program,
in a session of its own) holds the read end of a pipe from its worker and is told each group
as it starts and ends. When the worker dies, however it dies, the pipe reaches end of file and
the watcher stops the groups still registered (SIGTERM, grace, SIGKILL) and removes their cells'
directories. ``PR_SET_PDEATHSIG`` was not used: it fires when the *thread* that started the
child exits (a Ray worker starts trials from threads that end), it reaches only the direct child
and not what that child starts, and a SIGKILLed child leaves its own children running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

__all__ = ["start", "stop_group", "Watcher"]

# The watcher's code: standard library only, no hpsweep import (it starts in ~20 ms).
_WATCH = r"""
import os, shutil, signal, sys, time
groups = {}
for line in sys.stdin:
    op, _, rest = line.strip().partition(" ")
    if op == "+":
        pgid, grace, path = rest.split(" ", 2)
        groups[int(pgid)] = (float(grace), path)
    elif op == "-":
        groups.pop(int(rest), None)
def alive(g):
    try:
        os.killpg(g, 0)
        return True
    except OSError:
        return False
for g in groups:
    try:
        os.killpg(g, signal.SIGTERM)
    except OSError:
        pass
end = time.monotonic() + max((grace for grace, _ in groups.values()), default=0)
while any(alive(g) for g in groups) and time.monotonic() < end:
    time.sleep(0.05)
for g, (grace, path) in groups.items():
    try:
        os.killpg(g, signal.SIGKILL)
    except OSError:
        pass
    if path:
        shutil.rmtree(path, ignore_errors=True)
"""


class Watcher:
    """The worker's watcher process (see the module docstring); one per process, made on first use."""

    _lock = threading.Lock()
    _proc: subprocess.Popen | None = None
    _pid: int | None = None

    @classmethod
    def _pipe(cls):
        with cls._lock:
            if cls._proc is None or cls._pid != os.getpid() or cls._proc.poll() is not None:
                cls._proc = subprocess.Popen(
                    [sys.executable, "-S", "-c", _WATCH], stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                    start_new_session=True, close_fds=True)
                cls._pid = os.getpid()
            return cls._proc.stdin

    @classmethod
    def tell(cls, line: str) -> None:
        pipe = cls._pipe()
        with cls._lock:
            pipe.write(line.encode() + b"\n")
            pipe.flush()

    @classmethod
    def watch(cls, pgid: int, grace: float, cell_root: str) -> None:
        cls.tell(f"+ {pgid} {grace} {cell_root}")

    @classmethod
    def forget(cls, pgid: int) -> None:
        try:
            cls.tell(f"- {pgid}")
        except OSError:
            pass


#: the program is started behind a gate: a shell that waits for one line on its stdin before it
#: becomes the program (exec, stdin then /dev/null). The line is written once the watcher knows the
#: group; a worker killed before that closes the pipe and the gate exits without running anything.
_GATE = 'read _ || exit 111; exec "$@" </dev/null'


def start(argv: list[str], cwd: str, env: dict[str, str], grace: float, cell_root: str) -> subprocess.Popen:
    """The program, its output (stdout and stderr together) on a pipe, in a group of its own
    that the watcher knows before the program runs a single instruction of its own."""
    Watcher._pipe()   # started before the program, so that it never inherits the program
    proc = subprocess.Popen(["/bin/sh", "-c", _GATE, "hpsweep-cell", *argv], cwd=cwd, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, close_fds=True, bufsize=0)
    try:
        Watcher.watch(proc.pid, grace, cell_root)
    except BaseException:   # unwatched, it could outlive its worker: it does not run at all
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    try:
        proc.stdin.write(b"go\n")   # the gate opens: the program runs
    finally:
        proc.stdin.close()
    return proc


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:   # a member changed its user: still there
        return True


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the program's group, SIGKILL after ``grace`` seconds to what is left; the
    program reaped. Also for a program that exited, to end what it left running in its group."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if proc.poll() is not None and not _group_alive(pgid):
            break
        time.sleep(0.02)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    # SIGKILL is delivered, not yet acted on: wait (briefly) until no member of the group runs,
    # so that a caller never sees the cell's processes still there once it has ended
    end = time.monotonic() + 5.0
    while _running_members(pgid) and time.monotonic() < end:
        time.sleep(0.01)
    Watcher.forget(pgid)


def _running_members(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still alive (zombies, which only wait for their
    parent to reap them, do not count). Linux's /proc; elsewhere, the group's existence."""
    proc = "/proc"
    if not os.path.isdir(proc):
        return _group_alive(pgid)
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc}/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False
