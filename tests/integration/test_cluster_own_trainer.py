"""``hpsweep submit`` of a user's own trainer, with a requirement, to the real two-node Ray
cluster on loopback (``ray_cluster`` in conftest.py): the trainer file and the requirement (a
small wheel built here, so no package index is needed) travel with the job, Ray's runtime
environment installs the wheel on the node, and the cells run on the second node with it.
A command trainer whose program and data live in a ``workdir`` of their own travels the same
way: its directory is shipped, and each cell runs from the worker node's copy of it.
What is asserted is MLflow's: run statuses, the node each ran on, the metric the requirement
gives, the program's output kept with its run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from user_code import requirement_wheel, trainer_with_requirement  # noqa: E402

pytestmark = pytest.mark.slow

HPSWEEP = str(Path(sys.executable).with_name("hpsweep"))

#: the requirement: a distribution built in the test, with one constant the trainer reports
MAGIC = 42.5


def _hpsweep(cluster, *args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, **cluster.env}
    env.pop("RAY_AUTH_MODE")
    return subprocess.run([HPSWEEP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_submitted_own_trainer_runs_on_the_worker_with_its_requirement(ray_cluster, mlflow_server, moto_server,
                                                                      tmp_path):
    from test_cluster import _cell_runs, _nodes

    assert subprocess.run([sys.executable, "-c", "import hps_req_demo"], capture_output=True).returncode != 0
    project = tmp_path / "project"          # the user's project: no hpsweep in it
    (project / "wheels").mkdir(parents=True)
    wheel = requirement_wheel(tmp_path, project / "wheels", "hps-req-demo", "1.2.0", MAGIC)
    (project / "fit.py").write_text(trainer_with_requirement("hps_req_demo"))
    name = "cluster-own-trainer"
    (project / f"{name}.yaml").write_text(yaml.safe_dump({
        "name": name, "trainer": "./fit.py",
        "requirements": [f"./wheels/{wheel.name}"],
        "parameters": {"x": {"grid": [0.5, 1.5]}},
        "metric": {"name": "loss", "mode": "min"},
        # half a GPU: only the second node declares one, so the cells run there
        "resources": {"cpus": 1, "gpus": 0.5},
    }, sort_keys=False))
    bucket = moto_server.create_bucket()
    submitted = _hpsweep(ray_cluster, "submit", f"{name}.yaml", "--address", ray_cluster.dashboard_url,
                         "--tracking-uri", mlflow_server.url, "--storage", f"s3://{bucket}/ckpt",
                         "--s3-endpoint", moto_server.url, cwd=project, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    logs = _hpsweep(ray_cluster, "logs", job_id, "--follow", "--address", ray_cluster.dashboard_url,
                    cwd=project, timeout=480)
    assert logs.returncode == 0, logs.stdout[-4000:] + logs.stderr[-2000:]

    (gpu_node,) = [n for n, res in _nodes(ray_cluster).items() if res.get("GPU", 0) > 0]
    client, exp, runs = _cell_runs(mlflow_server.url, name)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["hpsweep.node_id"] for r in runs} == {gpu_node}
    for r in runs:
        assert r.data.metrics["magic"] == MAGIC     # imported from the installed requirement
        assert r.data.metrics["loss"] == pytest.approx(float(r.data.params["x"]) ** 2)


#: an unmodified program in the user's code directory: reads its data file and a module beside
#: it by relative paths, and says which copy of the file it read
PROGRAM = '''\
import argparse
import os

import weights

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float)
parser.add_argument("--seed", type=int)
args = parser.parse_args()
values = [float(v) for v in open("data/values.txt").read().split()]
print(f"source: {os.path.realpath('data/values.txt')}", flush=True)
print(f"total={weights.SCALE * sum(values)} loss={args.lr * sum(values)}", flush=True)
'''


def test_submitted_command_trainer_runs_from_its_shipped_workdir_on_the_worker(ray_cluster, mlflow_server,
                                                                              moto_server, tmp_path):
    """A command trainer whose program and data live in a ``workdir`` outside the sweep file's
    directory: submit ships that directory, the user's copy is deleted once the job is sent, and
    each cell, on the second node, reads the data file by its relative path from that node's own
    copy of the job's working directory."""
    from mlflow.tracking import MlflowClient
    from test_cluster import _cell_runs, _nodes

    project = tmp_path / "project"          # the user's project: no hpsweep in it
    code = project / "code"
    (code / "data").mkdir(parents=True)
    (code / "train.py").write_text(PROGRAM)
    (code / "weights.py").write_text("SCALE = 3\n")
    (code / "data" / "values.txt").write_text("1.5 2.5 4\n")
    name = "cluster-command-workdir"
    (project / "sweeps").mkdir()
    (project / "sweeps" / f"{name}.yaml").write_text(yaml.safe_dump({
        "name": name, "trainer": "command",
        "config": {"command": ["{python}", "train.py"], "workdir": str(code),
                   "metrics": [r"total=(?P<total>[0-9.]+) loss=(?P<loss>[0-9.]+)"]},
        "parameters": {"lr": {"grid": [0.5, 2.0]}},
        "metric": {"name": "loss", "mode": "min"},
        "resources": {"cpus": 1, "gpus": 0.5},     # only the second node declares a GPU
    }, sort_keys=False))
    bucket = moto_server.create_bucket()
    submitted = _hpsweep(ray_cluster, "submit", f"sweeps/{name}.yaml", "--address", ray_cluster.dashboard_url,
                         "--tracking-uri", mlflow_server.url, "--storage", f"s3://{bucket}/ckpt",
                         "--s3-endpoint", moto_server.url, cwd=project, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    shutil.rmtree(code)                     # sent: only the shipped copy can be read now
    logs = _hpsweep(ray_cluster, "logs", job_id, "--follow", "--address", ray_cluster.dashboard_url,
                    cwd=tmp_path, timeout=480)
    assert logs.returncode == 0, logs.stdout[-4000:] + logs.stderr[-2000:]

    (gpu_node,) = [n for n, res in _nodes(ray_cluster).items() if res.get("GPU", 0) > 0]
    client, exp, runs = _cell_runs(mlflow_server.url, name)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["hpsweep.node_id"] for r in runs} == {gpu_node}
    worker_tmp = ray_cluster.temp_dirs[1].resolve()
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [1]
        assert r.data.metrics["total"] == 3 * 8.0                     # weights.py and data/values.txt
        assert r.data.metrics["loss"] == pytest.approx(float(r.data.params["lr"]) * 8.0)
        log = Path(MlflowClient(mlflow_server.url).download_artifacts(r.info.run_id, "output.log",
                                                                      str(tmp_path))).read_text()
        (source,) = [line.split(": ", 1)[1] for line in log.splitlines() if line.startswith("source: ")]
        # the worker node's own copy of the job's working directory, at the workdir's place in it
        assert Path(source).is_relative_to(worker_tmp), (source, worker_tmp)
        assert source.endswith("/code/data/values.txt")
