"""The container tier: a private Docker engine, the project's images, the compose stack.

Run as root with ``make test-containers`` (it installs docker.io and debootstrap first). The
session starts ``dockerd`` (tests/containers/dockerenv.py), builds the base stand-in, the
hpsweep and MLflow images from docker/, the PostgreSQL and S3 stand-ins, and brings the stack
up with docker/compose.yaml + docker/compose.test.yaml. Timings go to the terminal summary
and to ``$HPSWEEP_CI_CACHE/timings.json``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dockerenv import (
    CACHE,
    REPO,
    TIMINGS,
    Builds,
    Engine,
    WheelIndex,
    build_images,
    compose_binary,
    free_port,
    write_timings,
)


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.section("container tier timings")
        for key, value in TIMINGS.items():
            terminalreporter.write_line(f"{key}: {json.dumps(value)}")


@dataclass
class Stack:
    engine: Engine
    env_file: Path
    secrets: dict[str, str]
    ports: dict[str, int]
    tmp: Path
    index: WheelIndex
    builds: Builds
    extra: dict = field(default_factory=dict)

    @property
    def compose_args(self) -> list[str]:
        return ["compose", "--env-file", str(self.env_file), "-f", str(REPO / "docker" / "compose.yaml"),
                "-f", str(REPO / "docker" / "compose.test.yaml")]

    def compose(self, *args: str, timeout: float = 600, check: bool = True):
        return self.engine.docker(*self.compose_args, *args, timeout=timeout, check=check)

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['MLFLOW_PORT']}"

    @property
    def ray_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['RAY_DASHBOARD_PORT']}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['S3_PORT']}"

    def container_ids(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def client_env(self) -> dict[str, str]:
        """A user's shell on the host: the token exported, as README's docker section says."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "HPSWEEP_"))}
        env.update(RAY_AUTH_TOKEN=self.secrets["RAY_AUTH_TOKEN"], PYTHONPATH=str(REPO),
                   HOME=str(self.tmp / "home"), MLFLOW_DISABLE_TELEMETRY="true",
                   RAY_USAGE_STATS_ENABLED="0")
        return env

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_url, region_name="us-east-1",
                            aws_access_key_id=self.secrets["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.secrets["AWS_SECRET_ACCESS_KEY"])

    def ray_get(self, path: str) -> dict:
        req = urllib.request.Request(self.ray_url + path, headers={
            "Authorization": f"Bearer {self.secrets['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def alive_nodes(self) -> list[dict]:
        data = self.ray_get("/api/v0/nodes?detail=1&limit=100")
        rows = data["data"]["result"]["result"]
        return [n for n in rows if n.get("state") == "ALIVE"]

    def wait_until_up(self, workers: int = 2, timeout: float = 1500) -> float:
        """Up with the override; waits for every health check and the workers' registration."""
        t0 = time.monotonic()
        self.compose("up", "-d", "--no-build", "--pull", "never", timeout=timeout + 60)
        deadline = t0 + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                nodes = self.alive_nodes()
                states = self.states()
                healthy = all(s["Health"] in ("healthy", "") and s["State"] == "running"
                              for name, s in states.items() if name != "create-bucket")
                if healthy and len(nodes) == workers + 1:
                    return time.monotonic() - t0
                last = f"nodes={len(nodes)} states={states}"
            except (OSError, KeyError, ValueError) as exc:
                last = repr(exc)
            time.sleep(2)
        logs = self.compose("logs", "--no-color", check=False).stdout
        if CACHE.exists():
            (CACHE / "last-stack.log").write_text(logs)
        raise AssertionError(f"stack not up in {timeout} s: {last}\n{logs[-8000:]}")

    def states(self) -> dict[str, dict]:
        out = self.compose("ps", "-a", "--format", "json").stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        if len(rows) == 1 and isinstance(rows[0], list):
            rows = rows[0]
        return {r["Service"] + ("" if r["Service"] != "ray-worker" else f"-{r['Name']}"): r
                for r in rows}


@pytest.fixture(scope="session")
def engine():
    if os.geteuid() != 0:
        pytest.fail("the container tier starts dockerd: run it as root (make test-containers)")
    tmp = Path(tempfile.mkdtemp(prefix="hpsw-", dir="/tmp"))  # short: socket paths
    eng = Engine(tmp)
    t0 = time.monotonic()
    eng.start(compose_binary())
    TIMINGS["engine_start_s"] = round(time.monotonic() - t0, 1)
    TIMINGS["data_root"] = str(eng.data_root)
    yield eng
    eng.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def images(engine):
    """Every image of the stack, built here; the local package index they install from."""
    built = build_images(engine)
    yield built
    TIMINGS["images"] = built.builds.summary()
    write_timings("last_run", TIMINGS)
    built.close()


@pytest.fixture(scope="session")
def stack(engine, images, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    (tmp / "home").mkdir()
    values = {
        "POSTGRES_USER": "mlflow",
        "POSTGRES_PASSWORD": secrets.token_hex(16),
        "AWS_ACCESS_KEY_ID": "hpsweep",
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
        "RAY_AUTH_TOKEN": secrets.token_hex(24),
    }
    ports = {k: free_port() for k in ("MLFLOW_PORT", "RAY_DASHBOARD_PORT", "S3_PORT", "S3_CONSOLE_PORT")}
    env_file = tmp / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {**values, **{k: str(v) for k, v in ports.items()},
                                                          "RAY_WORKER_CPUS": "1"}.items()))
    st = Stack(engine, env_file, values, ports, tmp, images.index, images.builds)
    # a stack left by an earlier run on a cached data root: gone, with its volumes
    st.compose("down", "-v", "--remove-orphans", check=False)
    TIMINGS["stack_start_s"] = round(st.wait_until_up(), 1)
    yield st
    logs = st.compose("logs", "--no-color", check=False).stdout
    (CACHE / "last-stack.log").write_text(logs) if CACHE.exists() else None
    st.compose("down", "-v", "--remove-orphans", check=False, timeout=300)
