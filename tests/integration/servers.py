"""Real servers on loopback for integration tests: moto_server (S3), mlflow server, a Ray cluster.

Each server is a process group of its own, started on a free loopback port, polled until it
answers, logging to a file whose tail is attached to the report of a failing test, and killed
(the whole group, by its id) on teardown. Nothing here kills a process it did not start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "ServerProcess",
    "ServerStartError",
    "free_port",
    "start_server",
    "start_on_free_port",
    "MotoServer",
    "start_moto_server",
    "MlflowServer",
    "start_mlflow_server",
    "RayCluster",
    "start_ray_cluster",
    "VENV_BIN",
    "group_cpu_seconds",
    "wait_settled",
]

#: the project's virtual environment: servers run from its executables, not from whatever is on PATH
VENV_BIN = Path(sys.executable).parent


class ServerStartError(RuntimeError):
    """A server did not become ready; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ServerProcess:
    """One started process (and its process group), with its log file."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 6000) -> str:
        """The last ``chars`` characters of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:  # the log may not exist if the exec itself failed
            return f"<no log: {exc}>"
        return text[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``timeout`` seconds."""
        pgid = self.proc.pid  # start_new_session=True: the group id is the leader's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        # children of the leader (uvicorn workers, raylets) may outlive it: kill the group
        deadline = time.monotonic() + 5
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_server(
    name: str,
    cmd: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ServerProcess:
    """Start ``cmd`` in a new session (its own process group), stdout+stderr into ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    return ServerProcess(name=name, proc=proc, log_path=log_path)


def wait_until(
    server: ServerProcess, ready: Callable[[], bool], *, timeout: float, what: str
) -> None:
    """Poll ``ready`` until it is true; fail early (with the log) if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise ServerStartError(
                f"{server.name} exited with code {server.proc.returncode} before {what}; "
                f"log {server.log_path}:\n{server.log_tail()}"
            )
        try:
            if ready():
                return
        except Exception:  # not answering yet: connection refused, 5xx, ...
            pass
        time.sleep(0.25)
    server.stop()
    raise ServerStartError(
        f"{server.name} not ready after {timeout:.0f}s ({what}); "
        f"log {server.log_path}:\n{server.log_tail()}"
    )


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group,
    leaving out mlflow's background job runner (it polls whether or not anyone asks)."""
    total, tick = 0, os.sysconf("SC_CLK_TCK")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            runner = b"_job_runner" in (d / "cmdline").read_bytes()
        except OSError:  # the process has exited meanwhile
            continue
        if int(fields[2]) == pgid and not runner:
            # fields after the name: state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / tick


def wait_settled(server: ServerProcess, timeout: float = 120.0, quiet_cpu_s: float = 0.1) -> float:
    """Wait until ``server`` uses less than ``quiet_cpu_s`` CPU seconds in one second: an
    ``mlflow server`` keeps starting things for a while after /health answers, and timings
    are taken against a settled server, as a user meets it. Returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        before = group_cpu_seconds(server.proc.pid)
        time.sleep(1.0)
        if group_cpu_seconds(server.proc.pid) - before < quiet_cpu_s:
            break
    return time.perf_counter() - start


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers with a status below 500."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500


def start_on_free_port(
    name: str,
    cmd_for_port: Callable[[int], Sequence[str]],
    *,
    log_dir: Path,
    ready_path: str,
    timeout: float,
    what: str,
    attempts: int = 3,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[ServerProcess, str]:
    """Start an HTTP server on a free loopback port and wait until ``ready_path`` answers.

    A port that was free when picked can be taken before the server binds it: then it is
    tried again on another port, ``attempts`` times in all. Returns the process and its URL.
    """
    last: Exception | None = None
    for _ in range(attempts):
        port = free_port()
        server = start_server(name, cmd_for_port(port), log_path=log_dir / f"{name}-{port}.log",
                              env=env, cwd=cwd)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(server, lambda: http_ok(f"{url}{ready_path}"), timeout=timeout, what=what)
            return server, url
        except ServerStartError as exc:
            server.stop()
            last = exc
    raise last  # type: ignore[misc]


# --- S3: moto_server ---------------------------------------------------------------------


@dataclasses.dataclass
class MotoServer:
    """A moto S3 server on loopback; ``env`` is what a client needs to talk to it."""

    process: ServerProcess
    url: str

    @property
    def env(self) -> dict[str, str]:
        """AWS settings for boto3, MLflow and hpsweep: endpoint and (fake) credentials."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ENDPOINT_URL_S3": self.url,
            "MLFLOW_S3_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            # moto is plain HTTP; keep boto3 from trying instance metadata for credentials
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        """A boto3 S3 client bound to this server."""
        import boto3

        env = self.env
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return its name."""
        name = name or f"test-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in ``bucket`` under ``prefix``."""
        paginator = self.client().get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys


def start_moto_server(log_dir: Path, attempts: int = 3) -> MotoServer:
    """Start ``moto_server`` on a free loopback port and wait until it answers."""
    server, url = start_on_free_port(
        "moto_server", lambda port: [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        log_dir=log_dir, ready_path="/moto-api/", timeout=60, what="S3 answers", attempts=attempts)
    return MotoServer(process=server, url=url)


# --- MLflow tracking server --------------------------------------------------------------


@dataclasses.dataclass
class MlflowServer:
    """An ``mlflow server`` with a SQLite store, serving artifacts from ``s3://bucket/prefix``."""

    process: ServerProcess
    url: str
    backend_store_uri: str
    artifacts_destination: str
    bucket: str
    prefix: str


def start_mlflow_server(
    moto: MotoServer, work_dir: Path, *, bucket: str | None = None, attempts: int = 3
) -> MlflowServer:
    """Start ``mlflow server --artifacts-destination s3://...`` on moto, one worker, on loopback."""
    work_dir.mkdir(parents=True, exist_ok=True)
    bucket = moto.create_bucket(bucket)
    prefix = "mlartifacts"
    destination = f"s3://{bucket}/{prefix}"
    backend = f"sqlite:///{work_dir / 'mlflow.db'}"
    env = {
        **moto.env,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "PYTHONUNBUFFERED": "1",
        # MLflow's job runner (huey consumers polling the store) is for GenAI jobs, which
        # hpsweep never starts: off, as in docker/Dockerfile.mlflow
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # a SQLite store behind a connection pool stalls under many writers (connections held
        # while SQLite's lock is waited for; bench/mlflow_sqlite.py); a connection a request
        # serves 64 writers at a batch a second each without an error
        "MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool",
    }
    server, url = start_on_free_port(
        "mlflow_server",
        lambda port: [
            str(VENV_BIN / "mlflow"), "server",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--workers", "1",
            "--backend-store-uri", backend,
            "--serve-artifacts",
            "--artifacts-destination", destination,
        ],
        log_dir=work_dir, env=env,
        cwd=work_dir,  # anything mlflow writes beside itself stays in the test's directory
        # the first start migrates the SQLite schema: slow on a loaded 2-core machine
        ready_path="/health", timeout=120, what="/health answers", attempts=attempts)
    return MlflowServer(process=server, url=url, backend_store_uri=backend,
                        artifacts_destination=destination, bucket=bucket, prefix=prefix)


# --- a two-node Ray cluster --------------------------------------------------------------


@dataclasses.dataclass
class RayCluster:
    """A head node and a second node on loopback, each under ``ray start --block``.

    ``env`` is what a client (``hpsweep submit``, ``ray.init``) needs: the isolated HOME with
    the cluster's auth token, token auth switched on, and the temp dir.
    """

    head: ServerProcess
    worker: ServerProcess
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]
    second_node_resource: str
    temp_dirs: tuple[Path, Path]

    @property
    def processes(self) -> tuple[ServerProcess, ServerProcess]:
        return (self.head, self.worker)

    def stop(self) -> None:
        """SIGTERM to each ``ray start --block`` stops its node; both at once, then the rest."""
        nodes = (self.worker, self.head)
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGTERM)
        # a node that is not gone after a few seconds is killed: its session dir is thrown away
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            for node in nodes:
                node.proc.poll()  # reap the leader: a zombie still counts as a group member
            if not any(_group_alive(node.proc.pid) for node in nodes):
                break
            time.sleep(0.2)
        for node in nodes:
            node.stop(timeout=1)  # SIGKILL whatever is left


def ray_env(home: Path, temp_dir: Path) -> dict[str, str]:
    """Environment that keeps a Ray node or client hermetic: its own HOME and temp dir."""
    return {
        "HOME": str(home),
        "RAY_TMPDIR": str(temp_dir),
        # token auth as in production (Ray 2.60's default for new clusters), the token in HOME
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # the job driver and the trials find `hpsweep` and the project's python first
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        # a node of a multi-node cluster: hpsweep's in-process Ray sets this to 0 in the test
        # process's environment once imported (hpsweep.run.localray), which `ray start` refuses
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
    }


def _cluster_resources(env: Mapping[str, str], gcs_address: str) -> dict[str, float]:
    """The cluster's total resources, asked in a child process (so this one stays Ray-free)."""
    code = (
        f"import json, ray; ray.init(address={gcs_address!r}, logging_level='ERROR'); "
        "print(json.dumps(ray.cluster_resources()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_ray_cluster(
    base: Path,
    *,
    head_cpus: int = 2,
    worker_cpus: int = 2,
    worker_gpus: int = 1,
    second_node_resource: str = "second_node",
    second_node_amount: int = 2,
    node_env: Mapping[str, str] | None = None,
) -> RayCluster:
    """Start a head and a second node (with a custom resource only it has) on 127.0.0.1.

    The second node also declares ``worker_gpus`` GPUs: Ray schedules by declared resources,
    so GPU trials land there (and share it when they ask for fractions) even on a machine
    without a GPU, where the trainer then runs on the CPU.

    ``base`` should be a short path: Ray puts unix sockets under its temp dir, and socket paths
    are limited to ~107 bytes. ``node_env`` is what every node's environment adds (e.g. the S3
    endpoint and credentials, as a cloud node has them from its role).
    """
    home = base / "home"
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    token_path = home / ".ray" / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    head_tmp, worker_tmp = base / "h", base / "w"
    head_tmp.mkdir(exist_ok=True)
    worker_tmp.mkdir(exist_ok=True)

    gcs_port, dash_port = free_port(), free_port()
    common = [
        "--node-ip-address", "127.0.0.1",
        "--disable-usage-stats",
        "--block",
        "--log-style", "record",
        "--log-color", "false",
    ]
    head_env = {**(node_env or {}), **ray_env(home, head_tmp)}
    head = start_server(
        "ray-head",
        [
            str(VENV_BIN / "ray"), "start", "--head",
            "--port", str(gcs_port),
            "--num-cpus", str(head_cpus),
            "--num-gpus", "0",
            "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash_port),
            "--dashboard-agent-listen-port", str(free_port()),
            "--ray-client-server-port", str(free_port()),
            "--temp-dir", str(head_tmp),
            *common,
        ],
        log_path=base / "ray-head.log",
        env=head_env,
    )
    gcs_address = f"127.0.0.1:{gcs_port}"
    dashboard_url = f"http://127.0.0.1:{dash_port}"
    worker: ServerProcess | None = None
    try:
        # the Jobs API answers /api/version once the dashboard's job module is up
        wait_until(head, lambda: http_ok(f"{dashboard_url}/api/version"), timeout=120,
                   what="the dashboard answers")
        worker = start_server(
            "ray-worker",
            [
                str(VENV_BIN / "ray"), "start",
                "--address", gcs_address,
                "--num-cpus", str(worker_cpus),
                "--num-gpus", str(worker_gpus),
                "--resources", f'{{"{second_node_resource}": {second_node_amount}}}',
                # two nodes on one host: the agent's fixed default port would collide
                "--dashboard-agent-listen-port", str(free_port()),
                "--temp-dir", str(worker_tmp),
                *common,
            ],
            log_path=base / "ray-worker.log",
            env={**(node_env or {}), **ray_env(home, worker_tmp)},
        )
        w = worker
        # `ray start` prints this once its raylet has registered with the head (cheap to poll)
        wait_until(w, lambda: "Ray runtime started" in w.log_tail(20000), timeout=120,
                   what="the second node starts")
        resources = _cluster_resources(head_env, gcs_address)
        if resources.get(second_node_resource, 0) < second_node_amount:
            raise ServerStartError(f"the second node did not join: cluster resources {resources}")
    except BaseException:
        if worker is not None:
            worker.stop()
        head.stop()
        raise
    return RayCluster(
        head=head,
        worker=worker,
        gcs_address=gcs_address,
        dashboard_url=dashboard_url,
        env=head_env,
        second_node_resource=second_node_resource,
        temp_dirs=(head_tmp, worker_tmp),
    )
