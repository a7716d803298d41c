"""Hardening, tested from outside with real parts (issue 14): no credential in any file Ray or
hpsweep writes, in-process Ray listening on loopback only, Ctrl-C during Ray start-up, a failing
trainer's error shown once, errors a retry cannot fix not retried.

Each sweep here runs ``hpsweep`` as a user would, in a process of its own with a private Ray
temp dir and HOME, so that every file searched is this run's.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HPSWEEP = str(Path(sys.executable).with_name("hpsweep"))


def _sweep(dir_: Path, body: str, name: str | None = None) -> tuple[Path, str]:
    name = name or f"h-{secrets.token_hex(4)}"
    path = dir_ / f"{name}.yaml"
    path.write_text(f"name: {name}\ntrainer: sleep\nmetric: {{name: loss, mode: min}}\n"
                    + textwrap.dedent(body))
    return path, name


def _hermetic(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A private Ray temp dir and HOME (short paths: Ray's unix sockets), no stray settings."""
    base = Path(f"/tmp/hh{secrets.token_hex(3)}")
    (base / "home").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_TRACKING", "HPSWEEP_", "RAY_"))}
    env.update({"RAY_TMPDIR": str(base), "HOME": str(base / "home"),
                "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
                "PYTHONPATH": str(REPO), **extra})
    return env



def _start_in_background(tmp_path: Path, config: str) -> tuple[subprocess.Popen, dict[str, str], str]:
    """``hpsweep run`` of a two-cell sleep sweep in a session of its own (a process group that
    a signal can reach as a terminal's Ctrl-C would): the process, its environment, the sweep."""
    env = _hermetic(tmp_path)
    path, name = _sweep(tmp_path, f"config: {config}\nparameters:\n  x: {{grid: [0.0, 1.0]}}\n")
    proc = subprocess.Popen([HPSWEEP, "run", str(path), "--no-live"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, env, name

def _files_containing(roots: list[Path], needles: list[str]) -> dict[str, int]:
    """Every regular file under ``roots`` that holds one of ``needles``: path -> count."""
    found: dict[str, int] = {}
    pattern = re.compile("|".join(re.escape(n) for n in needles).encode())
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                if path.is_symlink() or not path.is_file():
                    continue
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                hits = len(pattern.findall(data))
                if hits:
                    found[str(path)] = hits
    return found


# --- 1: credentials never reach Ray's runtime environments, logs or MLflow -------------------

def test_no_credential_in_any_file_a_local_sweep_writes(tmp_path) -> None:
    key_id = "AKIA" + secrets.token_hex(8).upper()
    secret = "sk" + secrets.token_urlsafe(30)
    token = "st" + secrets.token_urlsafe(30)
    env = _hermetic(tmp_path, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret,
                    AWS_SESSION_TOKEN=token)
    path, name = _sweep(tmp_path, """
        config: {reports: 2, sleep: 0.01}
        parameters:
          x: {grid: [0.0, 1.0]}
    """)
    proc = subprocess.run([HPSWEEP, "run", str(path), "--no-live"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ray_tmp, home = Path(env["RAY_TMPDIR"]), Path(env["HOME"])
    logs = list(ray_tmp.glob("ray/session_*/logs/runtime_env_agent.log"))
    assert logs, "Ray wrote no runtime-env agent log: the search below would prove nothing"
    assert (tmp_path / ".hpsweep" / "mlflow.db").is_file()
    leaks = _files_containing([ray_tmp, home, tmp_path], [key_id, secret, token])
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leaks, f"credentials written to: {leaks}"
    assert proc.stdout.count(secret) == 0 and proc.stderr.count(secret) == 0


def test_no_credential_in_any_file_a_submitted_sweep_writes(ray_cluster, mlflow_server, moto_server,
                                                            tmp_path) -> None:
    """The submitting shell's keys stay there; the nodes' own keys (moto's, in the nodes'
    environment) reach the trials through the nodes' environment, never a runtime env."""
    name = f"sec-{secrets.token_hex(3)}"
    wd = tmp_path / "project"
    for package in ("hpsweep", "trainers"):
        shutil.copytree(REPO / package, wd / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (wd / "sweeps").mkdir()
    sweep = {"name": name, "trainer": "sleep", "config": {"reports": 2, "sleep": 0.01},
             "parameters": {"x": {"grid": [0.0, 1.0, 2.0]}}, "seeds": 1,
             "metric": {"name": "loss", "mode": "min"}, "checkpoint": {"every": 1}}
    (wd / "sweeps" / f"{name}.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    planted = "sk" + secrets.token_urlsafe(30)
    # 4: credential files in the project directory, each holding a unique value
    in_files = "cf" + secrets.token_urlsafe(30)
    for cred in (".env", "secrets.env", ".netrc", "id_rsa", ".aws/credentials", "hpsweep/.env"):
        (wd / cred).parent.mkdir(parents=True, exist_ok=True)
        (wd / cred).write_text(f"AWS_SECRET_ACCESS_KEY={in_files}\n")
    env = {**os.environ, **ray_cluster.env, "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8),
           "AWS_SECRET_ACCESS_KEY": planted}
    env.pop("RAY_AUTH_MODE")
    bucket = moto_server.create_bucket()
    out = subprocess.run(
        [HPSWEEP, "submit", f"sweeps/{name}.yaml", "--address", ray_cluster.dashboard_url,
         "--tracking-uri", mlflow_server.url, "--storage", f"s3://{bucket}/ckpt",
         "--s3-endpoint", moto_server.url, "--follow"],
        cwd=wd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "3 cells finished" in out.stdout, out.stdout[-3000:]
    node_secret = moto_server.env["AWS_SECRET_ACCESS_KEY"]
    roots = [*ray_cluster.temp_dirs, mlflow_server.process.log_path.parent]
    assert not _files_containing(roots, [planted]), "the submitting shell's key reached the cluster"
    packages = [p for d in ray_cluster.temp_dirs for p in d.rglob("_ray_pkg_*") if p.is_dir()]
    assert any((p / "sweeps" / f"{name}.yaml").is_file() for p in packages), packages
    shipped = _files_containing(roots, [in_files])
    assert not shipped, f"credential files shipped with the job: {shipped}"
    # the nodes' own key: never copied into a runtime environment (which the agents log)
    agent_logs = [p for d in ray_cluster.temp_dirs for p in d.rglob("runtime_env_agent*.log")]
    assert agent_logs
    copied = re.compile(rb"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)\W{1,6}" + re.escape(node_secret.encode()))
    leaks = [str(p) for p in agent_logs if copied.search(p.read_bytes())]
    assert not leaks, f"the nodes' AWS keys were copied into runtime envs and logged: {leaks}"


# --- 7: Ctrl-C during Ray's start-up leaves no run RUNNING and no Ray process ------------------

def test_ctrl_c_during_ray_start_up_leaves_no_run_running(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    # Ctrl-C in a terminal: SIGINT to the whole foreground process group
    proc, env, name = _start_in_background(tmp_path, "{reports: 2, sleep: 0.01}")
    ray_tmp = Path(env["RAY_TMPDIR"])
    try:
        # Ray starts in a thread of its own while the driver creates the sweep's parent run:
        # Ctrl-C once both are under way (Ray takes seconds more to be up)
        deadline = time.monotonic() + 120
        while not (list(ray_tmp.glob("ray/session_*")) and _has_parent_run(tmp_path / ".hpsweep" / "mlflow.db")):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "Ray never started"
            time.sleep(0.05)
        # Ray's start-up can swallow one SIGINT (a person presses Ctrl-C again): repeat it
        # until the command exits
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # time to close its runs before a second Ctrl-C
        out, _ = proc.communicate(timeout=60)
        # no Ray process of the session outlives the command by more than 5 s (its agents did
        # by about a minute when the reaper started only after ray.init returned)
        from hpsweep.run.reaper import session_processes

        sessions = [str(s) for s in ray_tmp.glob("ray/session_2*")]
        deadline = time.monotonic() + 5
        while (left := [p for s in sessions for p in session_processes(s)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sessions and not left, {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what the interrupted start left behind
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # 130 from hpsweep's own handler; when a repeated Ctrl-C lands while Ray shuts down, the
    # process can also die of the signal (or of Ray's native shutdown): what must hold is that
    # the sweep did not run to the end and left no run RUNNING
    assert proc.returncode != 0, out[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / '.hpsweep' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("hpsweep.role") == "sweep"]
    assert [r.info.status for r in parents] == ["KILLED"], out[-3000:]
    assert not [r for r in runs if r.info.status == "RUNNING"], out[-3000:]


def test_ctrl_c_while_ray_starts_its_agents_leaves_no_ray_process(tmp_path) -> None:
    """Ctrl-C while ``ray.init`` has started Ray's agents but not yet returned: Ray's processes
    block SIGINT and its agents outlived the command by about a minute when the watcher that
    stops them was started only after ``ray.init`` returned (issue 22)."""
    from hpsweep.run.reaper import session_processes

    proc, env, _ = _start_in_background(tmp_path, "{reports: 2, sleep: 0.01}")
    ray_tmp = Path(env["RAY_TMPDIR"])
    try:
        deadline = time.monotonic() + 120
        while not list(ray_tmp.glob("ray/session_2*/logs/*agent*")):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "Ray never started its agents"
            time.sleep(0.02)
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        out, _ = proc.communicate(timeout=60)
        sessions = [str(s) for s in ray_tmp.glob("ray/session_2*")]
        deadline = time.monotonic() + 5
        while (left := [p for s in sessions for p in session_processes(s)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.returncode != 0, out[-3000:]
        assert not left, {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left}
    finally:
        for s in ray_tmp.glob("ray/session_2*"):   # what an unfixed start-up leaves behind
            for pid in session_processes(str(s)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _has_parent_run(db: Path) -> bool:
    """Whether the SQLite store has a sweep's parent run yet (read directly: it may be mid-migration)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1)) as conn:
            return bool(conn.execute("select count(*) from tags where key = 'hpsweep.role' "
                                     "and value = 'sweep'").fetchone()[0])
    except sqlite3.Error:
        return False


# --- 5: in-process Ray listens on loopback only ---------------------------------------------

def _tree(root: int, marker: str) -> dict[int, str]:
    """``root`` and its descendants, and every process whose command line names ``marker``
    (this run's Ray temp dir): pid -> command name."""
    parents, names, cmdlines = {}, {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdlines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        name_end = stat.rindex(")")
        names[int(entry.name)] = stat[stat.index("(") + 1:name_end]
        parents[int(entry.name)] = int(stat[name_end + 2:].split()[1])
    tree = {root}
    changed = True
    while changed:
        new = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        changed = bool(new)
        tree |= new
    tree |= {pid for pid, cmd in cmdlines.items() if marker in cmd}
    return {pid: cmdlines.get(pid, "").split(" ")[0] or names[pid] for pid in tree if pid in names}


def _listening(pids: dict[int, str]) -> list[tuple[str, int, str]]:
    """(address, port, process) of every TCP socket in LISTEN state that one of ``pids`` holds."""
    import ipaddress

    sockets: dict[str, tuple[str, int]] = {}
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            if family == 4:
                ip = str(ipaddress.IPv4Address(raw[::-1]))
            else:  # four little-endian 32-bit words
                ip = str(ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
            sockets[fields[9]] = (ip, int(hex_port, 16))
    found = []
    for pid, name in pids.items():
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in sockets:
                found.append((*sockets[target[8:-1]], name))
    return sorted(set(found))


def _is_loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_in_process_ray_listens_on_loopback_only(tmp_path) -> None:
    import sqlite3

    proc, env, name = _start_in_background(tmp_path, "{reports: 200, sleep: 0.5}")
    ray_tmp = Path(env["RAY_TMPDIR"])
    db = tmp_path / ".hpsweep" / "mlflow.db"
    try:
        deadline = time.monotonic() + 240
        while True:  # until both trials have opened their runs: every Ray process is up
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the trials never started"
            if db.exists():
                with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(db, timeout=1)) as c:
                    cells = c.execute("SELECT count(*) FROM tags WHERE key = 'hpsweep.role' "
                                      "AND value = 'cell'").fetchone()[0]
                    if cells >= 2:
                        break
            time.sleep(0.5)
        time.sleep(2)
        listening = _listening(_tree(proc.pid, str(ray_tmp)))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    names = " ".join(n for _, _, n in listening)
    print("\n" + "\n".join(f"{addr}:{port}  {name[:60]}" for addr, port, name in sorted(listening, key=lambda s: s[2])))
    # not vacuous: Ray's servers, and the trials' workers, were found and listen
    for server in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::ImplicitFunc"):
        assert server in names, f"{server} not among the listening processes: {listening}"
    exposed = [s for s in listening if not _is_loopback(s[0])]
    assert not exposed, f"listening beyond loopback: {exposed} (all: {listening})"


# --- 8: a SIGKILLed driver takes its Ray along; its cells show as stale, not running ---------

def test_a_killed_driver_leaves_no_ray_process_and_its_cells_show_stale(tmp_path) -> None:
    import sqlite3

    from mlflow.tracking import MlflowClient

    # the driver alone is killed (the OOM killer, `kill -9 PID`): not its process group
    env = _hermetic(tmp_path, HPSWEEP_LEASE_TTL="4")
    path, name = _sweep(tmp_path, "config: {reports: 60, sleep: 0.25}\nparameters:\n  x: {grid: [0.0, 1.0]}\n")
    proc = subprocess.Popen([HPSWEEP, "run", str(path), "--no-live"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ray_tmp = Path(env["RAY_TMPDIR"])
    db = tmp_path / ".hpsweep" / "mlflow.db"
    uri = f"sqlite:///{db}"
    try:
        deadline = time.monotonic() + 240
        while True:  # until both trials run and have logged a step
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the trials never started"
            if db.exists():
                with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(db, timeout=1)) as c:
                    if c.execute("SELECT count(DISTINCT run_uuid) FROM metrics").fetchone()[0] >= 2:
                        break
            time.sleep(0.5)
        session = next(ray_tmp.glob("ray/session_2*"))
        before = _tree(proc.pid, str(ray_tmp))
        assert any(n.startswith("ray::") for n in before.values()), before  # not vacuous
        running = subprocess.run([HPSWEEP, "status", str(path)], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=120)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # every Ray process of the session ends within seconds, not the minutes Ray's agents take
        from hpsweep.run.reaper import session_processes

        deadline = time.monotonic() + 30
        while (left := session_processes(str(session))) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in left}
        time.sleep(5)  # past the lease's TTL: nobody renews it
        stale = subprocess.run([HPSWEEP, "status", str(path)], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    runs = _cell_runs(uri, name)
    assert sorted(r.info.status for r in runs) == ["RUNNING", "RUNNING"]  # as MLflow has them
    assert running.returncode == 0, running.stderr
    assert "running 2" in running.stdout and "stale" not in running.stdout, running.stdout
    assert stale.returncode == 0, stale.stderr
    assert "stale 2" in stale.stdout and "running 0" in stale.stdout, stale.stdout
    assert "driver was killed" in stale.stdout and f"hpsweep run {path}" in stale.stdout, stale.stdout
    # the rerun resumes them: both FINISHED
    rerun = subprocess.run([HPSWEEP, "run", str(path), "--no-live"], env=_hermetic(tmp_path),
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    client = MlflowClient(uri)
    assert sorted(r.info.status for r in _cell_runs(uri, name)) == ["FINISHED", "FINISHED"]
    assert not client.search_runs([client.get_experiment_by_name(name).experiment_id],
                                  "attributes.status = 'RUNNING'")


# --- 9, 10: a failing trainer's error shown once, in its own terms; no retry that cannot help -

def _run_failing(tmp_path: Path, body: str, name: str, trainer: str = "sleep") -> tuple[subprocess.CompletedProcess, str]:
    env = _hermetic(tmp_path)
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\ntrainer: {trainer}\n" + textwrap.dedent(body))
    proc = subprocess.run([HPSWEEP, "run", str(path), "--no-live"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=400)
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    return proc, f"sqlite:///{tmp_path / '.hpsweep' / 'mlflow.db'}"


def _cell_runs(uri: str, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], "tags.`hpsweep.role` = 'cell'", max_results=100)


def test_a_trainer_failing_on_every_cell_is_reported_once_in_its_own_terms(tmp_path) -> None:
    name = f"fail-{secrets.token_hex(3)}"
    proc, uri = _run_failing(tmp_path, """
        metric: {name: loss, mode: min}
        config: {reports: 3, sleep: 0.01, fail_at: 1}
        parameters:
          x: {grid: [0.0, 1.0, 2.0, 3.0]}
        retries: 1
    """, name)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    message = "InjectedFailure: fail_at=1: failing on purpose at report 1"
    # once per distinct error (all four cells raise the same one), with the trainer's frame
    assert out.count(f"failed (retried first), and 3 more cells with the same error:\n{message}") == 1, out
    assert "trainers/sleep/training.py:" in out and "in train: raise InjectedFailure" in out
    # no Ray traceback on the user's screen
    assert "Traceback" not in out and "ray/tune" not in out and "RayTaskError" not in out, out
    # each per-trial "failed" line carries the message
    failed_lines = [line for line in out.splitlines() if " failed " in f" {line} " and line.startswith("[")]
    assert len(failed_lines) == 4 and all(message in line for line in failed_lines), failed_lines
    assert len(out.splitlines()) < 60, f"{len(out.splitlines())} lines:\n{out}"
    # the full traceback is kept in each cell's run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = _cell_runs(uri, name)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FAILED"}
    for run in runs:
        assert run.data.tags["hpsweep.error"] == message
        local = client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))
        text = Path(local).read_text()
        assert text.startswith("Traceback") and "trainers/sleep/training.py" in text and message in text


def test_an_error_a_retry_cannot_fix_is_not_retried(tmp_path) -> None:
    """A corpus directory without a training file: found by the trainer (it exists, so the
    pre-launch check passes), a ValueError: each cell fails once although retries: 3."""
    (tmp_path / "corpus").mkdir()
    name = f"noretry-{secrets.token_hex(3)}"
    proc, uri = _run_failing(tmp_path, f"""
        metric: {{name: valid/bpc, mode: min}}
        config: {{task: charlm, data: {tmp_path / 'corpus'}, cell: gru, hidden: 8, batch: 2,
                  seq_len: 8, window: 8, steps: 4, eval_every: 2, eval_batches: 1, threads: 1}}
        parameters:
          lr: {{grid: [0.01, 0.001]}}
        retries: 3
    """, name, trainer="snap")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "expected one file named like *train* in the directory" in out
    assert "retried first" not in out
    runs = _cell_runs(uri, name)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}
    # one attempt per cell: the cell's run was opened once
    attempts = [r.data.tags.get("hpsweep.attempts", "1") for r in runs]
    assert attempts == ["1", "1"], attempts


# --- 13: a sweep on a cluster refuses stores that would be lost -------------------------------

def test_a_job_without_a_tracking_server_is_refused_on_the_cluster(ray_cluster, tmp_path) -> None:
    """``submit`` with no flags, to nodes that set no MLFLOW_TRACKING_URI: the job itself
    refuses (exit 2) instead of writing its runs into Ray's temporary package directory."""
    name = f"lost-{secrets.token_hex(3)}"
    wd = tmp_path / "project"
    for package in ("hpsweep", "trainers"):
        shutil.copytree(REPO / package, wd / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (wd / "sweeps").mkdir()
    path, _ = _sweep(wd / "sweeps", """
        config: {reports: 2, sleep: 0.01}
        parameters:
          x: {grid: [0.0, 1.0]}
    """, name)
    env = {**os.environ, **ray_cluster.env}
    env.pop("RAY_AUTH_MODE")
    for key in ("MLFLOW_TRACKING_URI", "HPSWEEP_STORAGE"):
        env.pop(key, None)
    out = subprocess.run([HPSWEEP, "submit", f"sweeps/{path.name}", "--address", ray_cluster.dashboard_url,
                          "--follow"], cwd=wd, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "runs go to $MLFLOW_TRACKING_URI as set on the cluster nodes" in text
    assert "a sweep on a cluster must keep its runs and checkpoints where every node" in text, text[-3000:]
    assert "Ray's temporary copy of the working directory" in text
    assert "pass --tracking-uri http://MLFLOW-SERVER:5000" in text and "pass --storage s3://BUCKET/PREFIX" in text
    assert "Traceback" not in text
    assert "FAILED" in text
    # nothing was tracked in the job's directory
    for temp in ray_cluster.temp_dirs:
        assert not [p for p in temp.rglob("mlflow.db") if "_ray_pkg_" in str(p)]
