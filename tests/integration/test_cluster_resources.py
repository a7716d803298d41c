"""Resources a cluster cannot give, on the real two-node Ray cluster on loopback
(``conftest.ray_cluster``: a head with 2 CPUs, a second node with 2 CPUs, 1 declared GPU and
``second_node`` resources). The driver runs here (``hpsweep run --address``), as a user's
shell runs it; outcomes are read from MLflow and the storage.

- a request no node and no node type can ever hold fails at once with the cluster's offer;
- a custom resource that a node started later in the test declares is waited for, shown as
  waiting (the driver's log, ``status``), and then runs there;
- an autoscaler's node types (the cluster config an autoscaler reports to the GCS, written
  here as KubeRay's or the launcher's autoscaler writes it) decide between waiting and failing,
  and the waiting limit stops a sweep with its cells pending.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from servers import ServerProcess, free_port, ray_env, start_server

pytestmark = pytest.mark.slow

HPSWEEP = str(Path(sys.executable).with_name("hpsweep"))
# Tune's own "No trial is running ..." would come after 1 s of waiting: it must not reach the user
NO_RAY_WORDS = ("No trial is running", "Ignore this message", "SIGTERM", "Tuner.restore", "PC: @")


def _sweep(tmp_path: Path, name: str, resources: dict, reports: int = 2) -> Path:
    sweep = {
        "name": name, "trainer": "sleep",
        "config": {"reports": reports, "sleep": 0.2},
        "parameters": {"x": {"grid": [0.0, 1.0]}},
        "metric": {"name": "loss", "mode": "min"},
        "resources": resources,
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _env(cluster) -> dict[str, str]:
    env = {**os.environ, **cluster.env, "TUNE_WARN_INSUFFICENT_RESOURCE_THRESHOLD_S_AUTOSCALER": "1",
           "TUNE_WARN_INSUFFICENT_RESOURCE_THRESHOLD_S": "1"}
    return env  # a driver joining a token-authenticated cluster: RAY_AUTH_MODE=token, the token in ~/.ray


def _where(tmp_path: Path, mlflow) -> list[str]:
    # one machine's disk is every node's here: local storage is allowed on purpose
    return ["--tracking-uri", mlflow.url, "--storage", str(tmp_path / "storage"), "--allow-local-store"]


def _run(cluster, mlflow, tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([HPSWEEP, "run", "s.yaml", "--address", cluster.gcs_address, "--no-live",
                           *_where(tmp_path, mlflow), *args], cwd=tmp_path, env=_env(cluster),
                          capture_output=True, text=True, timeout=timeout)


def _runs(mlflow, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow.url)
    exp = client.get_experiment_by_name(name)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], "", max_results=100)
    parent = [r for r in runs if r.data.tags.get("hpsweep.role") == "sweep"]
    cells = [r for r in runs if r.data.tags.get("hpsweep.role") == "cell"]
    return client, parent[0], cells


def _status(cluster, mlflow, tmp_path: Path) -> str:
    out = subprocess.run([HPSWEEP, "status", "s.yaml", *_where(tmp_path, mlflow)[:4]], cwd=tmp_path,
                         env=_env(cluster), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _ray_py(cluster, code: str) -> str:
    """Run ``code`` in a process joined to the cluster (this one stays Ray-free)."""
    script = f"import json, ray; ray.init(address={cluster.gcs_address!r}, logging_level='ERROR')\n{code}"
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, **cluster.env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def test_a_request_no_node_can_ever_give_fails_at_once(ray_cluster, mlflow_server, tmp_path) -> None:
    _sweep(tmp_path, "res-never", {"cpus": 1, "gpus": 2})
    t0 = time.monotonic()
    out = _run(ray_cluster, mlflow_server, tmp_path)
    took = time.monotonic() - t0
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith(f"a trial asks for 2 GPUs, 1 CPU on one node, and the cluster at "
                               f"{ray_cluster.gcs_address} can never give it (its nodes: "), lines
    assert "1 GPU, 2 'second_node', 2 CPUs" in lines[0] and "no autoscaler node types" in lines[0]
    assert lines[1:] == ["s.yaml:16: resources.gpus: 2 but no node of the cluster can give more than 1 GPU; "
                         "override: --set resources.gpus=0"]
    assert "Traceback" not in out.stderr
    # nothing started: no experiment, nothing stored (the storage check made its directory)
    from mlflow.tracking import MlflowClient

    assert MlflowClient(mlflow_server.url).get_experiment_by_name("res-never") is None
    assert not [p for p in (tmp_path / "storage").rglob("*") if p.is_file()]
    print(f"refused in {took:.1f}s (joining the cluster included)")


def _start_node(cluster, resources: dict) -> ServerProcess:
    base = cluster.temp_dirs[0].parent
    tmp = base / f"n{free_port() % 1000}"
    tmp.mkdir()
    home = Path(cluster.env["HOME"])
    return start_server("ray-special", [
        str(Path(sys.executable).with_name("ray")), "start", "--address", cluster.gcs_address,
        "--num-cpus", "1", "--num-gpus", "0", "--resources", json.dumps(resources),
        "--node-ip-address", "127.0.0.1", "--dashboard-agent-listen-port", str(free_port()),
        "--temp-dir", str(tmp), "--disable-usage-stats", "--block", "--log-style", "record",
        "--log-color", "false",
    ], log_path=base / "ray-special.log", env=ray_env(home, tmp))


def _wait_for_text(path: Path, text: str, driver: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        assert driver.poll() is None, path.read_text()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"no {text!r} in {timeout}s: {path.read_text()[-3000:]}")


def test_a_custom_resource_is_waited_for_then_runs_on_the_node_that_brings_it(ray_cluster, mlflow_server,
                                                                               tmp_path) -> None:
    _sweep(tmp_path, "res-special", {"cpus": 1, "custom": {"special": 1}})
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        driver = subprocess.Popen([HPSWEEP, "run", "s.yaml", "--address", ray_cluster.gcs_address, "--no-live",
                                   "--node-wait", "600", *_where(tmp_path, mlflow_server)], cwd=tmp_path,
                                  env=_env(ray_cluster), stdout=out, stderr=err)
    node = None
    try:
        waiting = ("waiting for a node with 1 'special', 1 CPU: none up (no autoscaler: a node must join "
                   "declaring 'special')")
        _wait_for_text(out_path, waiting, driver, timeout=180)
        # status shows what the running sweep waits for, its cells pending
        status = _status(ray_cluster, mlflow_server, tmp_path)
        assert waiting in status and "pending 2" in status, status
        time.sleep(2)  # longer than Tune's threshold for its own warning (1 s here)
        node = _start_node(ray_cluster, {"special": 1})
        assert driver.wait(timeout=300) == 0, out_path.read_text()[-3000:] + err_path.read_text()[-3000:]
        node_id = _ray_py(ray_cluster, "print([n['NodeID'] for n in ray.nodes() if n['Alive'] "
                                       "and n['Resources'].get('special')][0])")
    finally:
        if driver.poll() is None:
            driver.kill()
        if node is not None:
            node.stop()
    text = out_path.read_text() + err_path.read_text()
    assert "a node can hold the trials now" in text
    assert not [w for w in NO_RAY_WORDS if w in text], text
    client, parent, cells = _runs(mlflow_server, "res-special")
    assert parent.info.status == "FINISHED" and not parent.data.tags.get("hpsweep.waiting")
    assert sorted(r.info.status for r in cells) == ["FINISHED", "FINISHED"]
    assert {r.data.tags["hpsweep.node_id"] for r in cells} == {node_id}  # where 'special' is
    for r in cells:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert steps == sorted(set(steps)) and len(steps) == 2, steps


def test_node_types_decide_and_the_waiting_limit_leaves_cells_pending(ray_cluster, mlflow_server,
                                                                     tmp_path) -> None:
    """The cluster config an autoscaler reports (KubeRay's worker groups with maxReplicas, the
    launcher's available_node_types) is read from the GCS, where Ray keeps it: beyond every
    node type fails at once; a node type that fits is waited for, until the limit stops the
    sweep with its cells pending (no run, no lease), the sweep's run KILLED, not FAILED."""
    put = ("from ray.core.generated import autoscaler_pb2 as pb\n"
           "from ray.experimental import internal_kv as kv\n"
           "c = pb.ClusterConfig(); g = c.node_group_configs.add(); g.name = 'gpu-group'; g.max_count = 3\n"
           "g.resources.update({'CPU': 4, 'GPU': 4})\n"
           "kv._internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), c.SerializeToString(),"
           " namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())\nprint('ok')")
    delete = ("from ray.experimental import internal_kv as kv\n"
              "kv._internal_kv_del(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(),"
              " namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())\nprint('ok')")
    assert _ray_py(ray_cluster, put) == "ok"
    try:
        _sweep(tmp_path, "res-types", {"cpus": 1, "gpus": 8})
        never = _run(ray_cluster, mlflow_server, tmp_path)
        assert never.returncode == 2, never.stdout + never.stderr
        assert "its autoscaler's node types: gpu-group (4 GPUs, 4 CPUs, up to 3)" in never.stderr
        assert "resources.gpus: 8 but no node of the cluster can give more than 4 GPUs" in never.stderr
        out = _run(ray_cluster, mlflow_server, tmp_path, "--node-wait", "3", "--set", "resources.gpus=4")
        assert out.returncode == 3, out.stdout + out.stderr
        waiting = "waiting for a node with 4 GPUs, 1 CPU: 0 of 3 up"
        assert waiting in out.stdout
        assert out.stderr.strip().startswith(f"stopped: {waiting} for 3s with no trial started; the 2 "
                                             "unfinished cells are left pending"), out.stderr
    finally:
        assert _ray_py(ray_cluster, delete) == "ok"
    assert not [w for w in NO_RAY_WORDS if w in out.stdout + out.stderr], out.stdout + out.stderr
    _, parent, cells = _runs(mlflow_server, "res-types")
    assert parent.info.status == "KILLED" and cells == []
    assert not list((tmp_path / "storage").glob("leases/*.json"))
    assert json.loads(parent.data.tags["hpsweep.overrides"]) == ["resources.gpus=4"]  # recorded
    status = _status(ray_cluster, mlflow_server, tmp_path)  # the file's gpus: 8, its own cells
    assert "pending 2" in status and "waiting for" not in status, status
