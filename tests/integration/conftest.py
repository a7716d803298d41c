"""Shared fixtures for integration tests: real servers on loopback.

- ``moto_server`` (session): an S3 API; ``moto_server.env`` holds the endpoint and fake keys,
  ``moto_server.create_bucket()`` makes a fresh bucket, ``moto_server.keys(bucket, prefix)``
  lists what landed.
- ``mlflow_server`` (session): ``mlflow server`` (SQLite store, ``--workers 1``) serving
  artifacts from ``s3://<bucket>/mlartifacts`` on moto_server; ``mlflow_server.url`` is the
  tracking URI. Tests share it, so each should use an experiment name of its own.
- ``aws_env`` (function): puts ``moto_server.env`` into ``os.environ`` for the test.
- ``ray_cluster`` (session): a head plus a second node (custom resource ``second_node``, one
  declared GPU) on
  127.0.0.1 under a private HOME/RAY_TMPDIR, with token auth on, the nodes holding moto's S3
  credentials; ``ray_cluster.env`` is the client environment, ``ray_cluster.dashboard_url``
  the Jobs API address.

A failing test gets the tail of every server log it used attached to its report.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from servers import (
    MlflowServer,
    MotoServer,
    RayCluster,
    ServerProcess,
    start_mlflow_server,
    start_moto_server,
    start_ray_cluster,
)


def _processes(value) -> list[ServerProcess]:
    if isinstance(value, ServerProcess):
        return [value]
    if isinstance(value, (MotoServer, MlflowServer)):
        return [value.process]
    if isinstance(value, RayCluster):
        return list(value.processes)
    return []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the tails of the server logs to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        funcargs = getattr(item, "funcargs", {}) or {}
        for name, value in funcargs.items():
            for proc in _processes(value):
                report.sections.append(
                    (f"{proc.name} log ({proc.log_path})", proc.log_tail())
                )


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> MotoServer:
    """A moto S3 server on a free loopback port, for the whole session."""
    server = start_moto_server(tmp_path_factory.mktemp("moto"))
    yield server
    server.process.stop()


@pytest.fixture(scope="session")
def mlflow_server(moto_server, tmp_path_factory) -> MlflowServer:
    """``mlflow server`` with a SQLite store and S3 (moto) artifacts served through it."""
    server = start_mlflow_server(moto_server, tmp_path_factory.mktemp("mlflow"))
    yield server
    # every request is committed to SQLite as it is served: nothing to wait for on shutdown
    server.process.stop(timeout=3)


@pytest.fixture
def aws_env(moto_server, monkeypatch) -> dict[str, str]:
    """The moto endpoint and fake credentials in ``os.environ`` for one test."""
    for key, value in moto_server.env.items():
        monkeypatch.setenv(key, value)
    return moto_server.env


@pytest.fixture(scope="session")
def ray_cluster(moto_server) -> RayCluster:
    """A two-node Ray cluster on loopback; the second node alone has ``second_node`` resources
    and one (declared) GPU.

    Its nodes hold the S3 credentials of ``moto_server`` in their environment, as cloud nodes
    hold theirs: a submitted job carries none.
    """
    # short base path: Ray's unix sockets live under the temp dir (~107-byte path limit)
    base = Path(tempfile.mkdtemp(prefix="hpr", dir="/tmp"))
    creds = {k: v for k, v in moto_server.env.items() if k.startswith("AWS_") and "ENDPOINT" not in k}
    cluster = start_ray_cluster(base, node_env=creds)
    yield cluster
    cluster.stop()
    if os.environ.get("HPSWEEP_KEEP_TEST_DIRS") is None:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def local_ray():
    """One in-process Ray for the session (what `hpsweep run` starts by default), hermetic:
    its own temp dir, and a private HOME for the auth token Ray makes there."""
    import secrets

    import ray

    tmp = Path("/tmp") / f"hps{secrets.token_hex(3)}"  # Ray's socket paths must stay short
    (tmp / "home").mkdir(parents=True)
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_AUTH_MODE", "HOME")}
    os.environ.pop("RAY_AUTH_MODE", None)  # Ray's default: token auth, a token made under HOME
    os.environ.update({"RAY_TMPDIR": str(tmp), "HOME": str(tmp / "home")})
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if os.environ.get("HPSWEEP_KEEP_TEST_DIRS") is None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
