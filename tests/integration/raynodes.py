"""A Ray cluster of several nodes on loopback, as ``ray start`` makes one: a head and ``nodes - 1``
more, each ``ray start --block`` in a process group of its own, every node with ``cpus`` CPUs.
For the tests and benchmarks at cluster scale (``bench/slots.py``, ``test_slots.py``); the
two-node cluster with a dashboard is :func:`servers.start_ray_cluster`'s."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from servers import (
    VENV_BIN,
    ServerProcess,
    ServerStartError,
    _cluster_resources,
    _group_alive,
    free_port,
    ray_env,
    start_server,
    wait_until,
)

__all__ = ["RayNodes", "start_ray_nodes"]


@dataclasses.dataclass
class RayNodes:
    """The nodes (the head first); ``env`` is what a driver needs (HOME with the token, ...)."""

    nodes: list[ServerProcess]
    gcs_address: str
    env: dict[str, str]
    base: Path

    def stop(self) -> None:
        """SIGTERM to every ``ray start --block`` at once, then SIGKILL what is left."""
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for node in self.nodes:
                node.proc.poll()
            if not any(_group_alive(node.proc.pid) for node in self.nodes):
                break
            time.sleep(0.2)
        for node in self.nodes:
            node.stop(timeout=1)


def start_ray_nodes(base: Path, nodes: int, cpus: int, node_env: Mapping[str, str] | None = None,
                    timeout: float = 300) -> RayNodes:
    """``nodes`` Ray nodes of ``cpus`` CPUs each on 127.0.0.1 (no dashboard), token auth on,
    under ``base`` (a short path: Ray's socket paths are limited to about 107 bytes).
    ``node_env``: what every node's environment adds (S3 credentials, as cloud nodes have)."""
    home = base / "home"
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    token = home / ".ray" / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--block", "--log-style",
              "record", "--log-color", "false", "--num-cpus", str(cpus), "--num-gpus", "0"]
    gcs = f"127.0.0.1:{free_port()}"
    started: list[ServerProcess] = []
    head_env: dict[str, str] = {}
    try:
        for i in range(nodes):
            tmp = base / f"n{i}"
            tmp.mkdir(exist_ok=True)
            env = {**(node_env or {}), **ray_env(home, tmp)}
            role = (["--head", "--port", gcs.rsplit(":", 1)[1], "--include-dashboard", "false",
                     "--ray-client-server-port", str(free_port())] if i == 0 else ["--address", gcs])
            node = start_server(f"ray-node{i}", [str(VENV_BIN / "ray"), "start", *role, *common,
                                                 "--dashboard-agent-listen-port", str(free_port()),
                                                 "--temp-dir", str(tmp)],
                                log_path=base / f"ray-node{i}.log", env=env)
            started.append(node)
            if i == 0:
                head_env = env
                # the others join only once the head's GCS is up
                wait_until(node, lambda n=node: "Ray runtime started" in n.log_tail(20000),
                           timeout=timeout, what="the head starts")
        for node in started[1:]:
            wait_until(node, lambda n=node: "Ray runtime started" in n.log_tail(20000),
                       timeout=timeout, what=f"{node.name} starts")
        deadline = time.monotonic() + timeout
        while (have := _cluster_resources(head_env, gcs).get("CPU", 0)) < nodes * cpus:
            if time.monotonic() > deadline:
                raise ServerStartError(f"{have} CPUs joined, {nodes * cpus} expected")
            time.sleep(1)
    except BaseException:
        for node in started:
            node.stop(timeout=2)
        raise
    return RayNodes(started, gcs, head_env, base)
