"""The compose stack for real: images built from docker/, the stack up on a private engine,
sweeps submitted from the host with ``hpsweep submit``, outcomes read where a user reads them
(MLflow's REST API, the S3 bucket, ``hpsweep status``/``report``, ``docker`` itself).

The tests run in file order and share one stack (conftest.py); each names its own sweep.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from dockerenv import IMAGE, MLFLOW_IMAGE, REPO, TIMINGS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from user_code import requirement_wheel, trainer_with_requirement  # noqa: E402

HPSWEEP = str(Path(sys.executable).with_name("hpsweep"))
QUICKSTART = yaml.safe_load((REPO / "sweeps" / "quickstart.yaml").read_text())
METRIC = QUICKSTART["metric"]["name"]


# --- helpers: the CLI, MLflow's REST API, S3 ----------------------------------------------


def hpsweep(stack, *args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([HPSWEEP, *args], cwd=cwd, env=stack.client_env(), capture_output=True,
                          text=True, timeout=timeout)


def submit_and_wait(stack, sweep_file: str, cwd: Path) -> tuple[str, float]:
    t0 = time.monotonic()
    out = hpsweep(stack, "submit", sweep_file, "--address", stack.ray_url, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    job = out.stdout.strip().splitlines()[0]
    logs = hpsweep(stack, "logs", job, "--follow", "--address", stack.ray_url, cwd=cwd)
    wall = time.monotonic() - t0
    assert logs.returncode == 0, logs.stdout[-6000:] + logs.stderr[-3000:]
    status = hpsweep(stack, "status", job, "--address", stack.ray_url, cwd=cwd, timeout=120)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout, status.stdout + status.stderr
    return job, wall


def mlflow(stack, path: str, body: dict | None = None) -> dict:
    url = f"{stack.mlflow_url}/api/2.0/mlflow/{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def cell_runs(stack, experiment: str) -> list[dict]:
    exp = mlflow(stack, f"experiments/get-by-name?experiment_name={experiment}")["experiment"]
    runs, token = [], None
    while True:
        body = {"experiment_ids": [exp["experiment_id"]], "max_results": 500,
                "filter": "tags.`hpsweep.role` = 'cell'"}
        if token:
            body["page_token"] = token
        page = mlflow(stack, "runs/search", body)
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return runs


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def history(stack, run_id: str, key: str = METRIC) -> list[dict]:
    from urllib.parse import quote

    # a run that has not logged ``key`` yet: MLflow's REST API answers {} (no "metrics" at all)
    return mlflow(stack, f"metrics/get-history?run_id={run_id}&metric_key={quote(key)}").get("metrics", [])


def checkpoint_keys(stack, prefix: str) -> list[str]:
    s3 = stack.s3()
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="hpsweep", Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return [k for k in keys if k.endswith("checkpoint.pt")]


def published_step(stack, cell: str) -> int:
    """The report step of the checkpoint the cell's lease record points at (0: none yet): what
    a successor resumes from. MLflow may show later steps: a flush sends its metrics before it
    publishes the checkpoint that goes with them (so that no resumed run misses a step)."""
    s3 = stack.s3()
    try:
        record = json.loads(s3.get_object(Bucket="hpsweep", Key=f"checkpoints/leases/{cell}.json")["Body"].read())
    except s3.exceptions.NoSuchKey:
        return 0
    return int(((record.get("info") or {}).get("checkpoint") or {}).get("step") or 0)


def expected_steps(config: dict) -> list[int]:
    """The steps the SnAp trainer reports at: every ``eval_every`` and the last."""
    steps, every = config["steps"], config["eval_every"]
    return sorted({*range(every, steps + 1, every), steps})


def container_ip(stack, cid: str) -> str:
    return stack.engine.docker(
        "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", cid).stdout.strip()


def worker_nodes(stack) -> dict[str, str]:
    """Ray node id -> worker container id, matched by the container's address."""
    by_ip = {container_ip(stack, cid): cid for cid in stack.container_ids("ray-worker")}
    return {n["node_id"]: by_ip[n["node_ip"]] for n in stack.alive_nodes()
            if not n.get("is_head_node") and n["node_ip"] in by_ip}


def working_dir(tmp_path: Path, sweep: dict) -> Path:
    """What a user ships: the project's code and one sweep file."""
    wd = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("hpsweep", "trainers"):
        shutil.copytree(REPO / package, wd / package, ignore=ignore)
    (wd / "sweeps").mkdir()
    (wd / "sweeps" / f"{sweep['name']}.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    return wd


# --- the tests -----------------------------------------------------------------------------


def test_every_service_is_healthy_and_the_workers_are_ray_nodes(stack):
    states = stack.states()
    for service in ("postgres", "minio", "mlflow"):
        assert states[service]["State"] == "running" and states[service]["Health"] == "healthy", states[service]
    assert states["create-bucket"]["State"] == "exited" and states["create-bucket"]["ExitCode"] == 0
    assert states["ray-head"]["State"] == "running"
    workers = stack.container_ids("ray-worker")
    assert len(workers) == 2
    nodes = stack.alive_nodes()
    assert len(nodes) == 3
    (head,) = [n for n in nodes if n.get("is_head_node")]
    assert head["resources_total"].get("CPU", 0) == 0  # the head runs drivers, not trials
    mapping = worker_nodes(stack)
    assert sorted(mapping.values()) == sorted(workers), (mapping, workers)
    for n in nodes:
        if n["node_id"] in mapping:
            assert n["resources_total"]["CPU"] == 1
    # MLflow answers on loopback, backed by PostgreSQL (its store URI names it)
    with urllib.request.urlopen(f"{stack.mlflow_url}/health", timeout=10) as resp:
        assert resp.status == 200
    inspect = json.loads(stack.engine.docker("inspect", stack.container_ids("mlflow")[0]).stdout)[0]
    assert any(a.startswith("--backend-store-uri=postgresql+psycopg://") for a in inspect["Args"])


def test_quickstart_submitted_from_the_host_runs_to_the_end(stack, tmp_path):
    job, wall = submit_and_wait(stack, "sweeps/quickstart.yaml", cwd=REPO)
    TIMINGS["quickstart_through_stack_s"] = round(wall, 1)
    stack.extra["quickstart_job"] = job

    runs = cell_runs(stack, QUICKSTART["name"])
    assert len(runs) == 12
    assert {r["info"]["status"] for r in runs} == {"FINISHED"}
    cells = {tags(r)["hpsweep.cell_id"] for r in runs}
    assert len(cells) == 12
    want = expected_steps(QUICKSTART["config"])
    for r in runs:
        steps = [m["step"] for m in history(stack, r["info"]["run_id"])]
        assert sorted(steps) == want, (tags(r)["hpsweep.cell_id"], sorted(steps))
    # every checkpoint in the stack's bucket, one per cell
    keys = checkpoint_keys(stack, f"checkpoints/{QUICKSTART['name']}/")
    assert {k.split("/")[-2] for k in keys} == cells, keys
    # the trials ran on the worker containers, and on both of them
    workers = worker_nodes(stack)
    used = {tags(r)["hpsweep.node_id"] for r in runs}
    assert used <= set(workers), (used, workers)
    assert len(used) == 2
    stack.extra["quickstart_runs"] = {r["info"]["run_id"]: r["info"]["end_time"] for r in runs}

    # the report, from the stack's MLflow
    out = tmp_path / "report"
    rep = hpsweep(stack, "report", "sweeps/quickstart.yaml", "--tracking-uri", stack.mlflow_url,
                  "--out", str(out), cwd=REPO, timeout=600)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    html_files = list(out.rglob("*.html"))
    md_files = list(out.rglob("*.md"))
    assert html_files and md_files, list(out.rglob("*"))
    text = md_files[0].read_text()
    assert QUICKSTART["name"] in text and METRIC in text


#: the requirement of the user's trainer: a distribution built in the test (no index), one constant
REQ_MAGIC = 17.25


def test_an_external_trainer_with_a_requirement_runs_on_the_workers(stack, tmp_path):
    """A user's trainer file and its requirement (a wheel built here) in a project outside the
    checkout, submitted from there: both travel with the job, Ray installs the wheel on the
    worker containers, and each cell reports what only the installed requirement holds."""
    assert subprocess.run([sys.executable, "-c", "import hps_stack_req"], capture_output=True).returncode != 0
    lab = tmp_path / "lab"                 # the user's project: no hpsweep in it
    (lab / "wheels").mkdir(parents=True)
    assert not lab.resolve().is_relative_to(REPO)
    wheel = requirement_wheel(tmp_path, lab / "wheels", "hps-stack-req", "0.3", REQ_MAGIC)
    (lab / "fit.py").write_text(trainer_with_requirement("hps_stack_req"))
    name = "stack-own-trainer"
    (lab / f"{name}.yaml").write_text(yaml.safe_dump({
        "name": name, "trainer": "./fit.py", "requirements": [f"./wheels/{wheel.name}"],
        "parameters": {"x": {"grid": [0.5, 1.5]}}, "metric": {"name": "loss", "mode": "min"},
    }, sort_keys=False))
    job, wall = submit_and_wait(stack, f"{name}.yaml", cwd=lab)
    TIMINGS["own_trainer_through_stack_s"] = round(wall, 1)

    runs = cell_runs(stack, name)
    assert len(runs) == 2 and {r["info"]["status"] for r in runs} == {"FINISHED"}
    assert len({tags(r)["hpsweep.cell_id"] for r in runs}) == 2
    assert {tags(r)["hpsweep.node_id"] for r in runs} <= set(worker_nodes(stack))
    for r in runs:
        metrics = {m["key"]: m["value"] for m in r["data"].get("metrics", [])}
        assert metrics["magic"] == REQ_MAGIC                     # imported from the installed wheel
        assert metrics["loss"] == float(params(r)["x"]) ** 2
        assert [m["step"] for m in history(stack, r["info"]["run_id"], "loss")] == [1]


def test_no_secret_in_images_or_runs_and_ports_on_loopback(stack):
    values = [v for k, v in stack.secrets.items() if k in ("POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY",
                                                            "RAY_AUTH_TOKEN")]
    secretish = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)[A-Z_]*=\S+")
    for image in (IMAGE, MLFLOW_IMAGE):
        hist = stack.engine.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
        env = stack.engine.docker("image", "inspect", "-f", "{{json .Config.Env}}", image).stdout
        for text in (hist, env):
            assert not secretish.search(text), (image, secretish.search(text).group(0))
            assert not any(v in text for v in values)
        found = stack.engine.docker("run", "--rm", "--network", "none", "--entrypoint", "find", image,
                                    "/", "-xdev",
                                    "(", "-name", ".env", "-o", "-name", "secrets.env", ")",
                                    timeout=300, check=False).stdout.split()
        assert found == [], (image, found)
    runs = cell_runs(stack, QUICKSTART["name"])
    assert runs
    for r in runs:
        blob = json.dumps([params(r), tags(r)])
        assert not any(v in blob for v in values), r["info"]["run_id"]
        assert "AWS_SECRET_ACCESS_KEY" not in blob and "RAY_AUTH_TOKEN" not in blob
    # every published port of every container is bound to the loopback address
    published = []
    for cid in stack.compose("ps", "-q").stdout.split():
        info = json.loads(stack.engine.docker("inspect", cid).stdout)[0]
        for port, binds in (info["NetworkSettings"]["Ports"] or {}).items():
            for b in binds or []:
                published.append((info["Name"], port, b["HostIp"], b["HostPort"]))
    assert published and {p[2] for p in published} == {"127.0.0.1"}, published
    assert {int(p[3]) for p in published} == set(stack.ports.values())


def test_a_worker_killed_mid_sweep_and_the_sweep_still_finishes(stack, tmp_path):
    sweep = json.loads(json.dumps(QUICKSTART))
    sweep["name"] = "quickstart-kill"
    sweep["config"]["steps"] = 3000
    sweep["parameters"] = {"method": {"grid": ["bptt", "snap1"]}, "lr": {"pow10": [-2, -2.5]}}
    sweep["seeds"] = 1
    wd = working_dir(tmp_path, sweep)
    out = hpsweep(stack, "submit", f"sweeps/{sweep['name']}.yaml", "--address", stack.ray_url,
                  cwd=wd, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    job = out.stdout.strip().splitlines()[0]
    every = sweep["config"]["eval_every"]

    # wait for a trial on a worker that has reported twice and published a checkpoint
    deadline = time.monotonic() + 600
    victim = None
    while victim is None and time.monotonic() < deadline:
        time.sleep(1)
        try:
            runs = cell_runs(stack, sweep["name"])
        except OSError:
            continue
        except urllib.error.HTTPError:
            continue
        workers = worker_nodes(stack)
        for r in runs:
            t = tags(r)
            if r["info"]["status"] != "RUNNING" or t.get("hpsweep.node_id") not in workers:
                continue
            steps = [m["step"] for m in history(stack, r["info"]["run_id"])]
            if len(steps) < 2 or max(steps) >= sweep["config"]["steps"]:
                continue
            published = published_step(stack, t["hpsweep.cell_id"])
            if published >= every:
                victim = (workers[t["hpsweep.node_id"]], t["hpsweep.cell_id"], published)
                break
    assert victim, "no trial reached two reports on a worker"
    cid, cell, reached = victim
    killed_ms = time.time() * 1000
    stack.engine.docker("kill", cid)

    logs = hpsweep(stack, "logs", job, "--follow", "--address", stack.ray_url, cwd=wd)
    assert logs.returncode == 0, logs.stdout[-6000:] + logs.stderr[-3000:]

    runs = cell_runs(stack, sweep["name"])
    by_cell: dict[str, list[dict]] = {}
    for r in runs:
        by_cell.setdefault(tags(r)["hpsweep.cell_id"], []).append(r)
    assert len(by_cell) == 4
    for c, rs in by_cell.items():
        assert [r["info"]["status"] for r in rs].count("FINISHED") == 1, (c, [r["info"]["status"] for r in rs])
    # the killed cell went on from its S3 checkpoint (the one published when it was killed, or a
    # later one): after the kill it reported only steps past it, each once, up to the end
    hist = [m for r in by_cell[cell] for m in history(stack, r["info"]["run_id"])]
    after = sorted(m["step"] for m in hist if m["timestamp"] >= killed_ms)
    assert after, hist
    assert after[0] > every and after[0] > reached, (reached, after[:3])
    assert after == [s for s in expected_steps(sweep["config"]) if s >= after[0]], after
    TIMINGS["kill"] = {"cell": cell, "checkpoint_before_kill": reached, "resumed_at": after[0]}
    # the killed worker is not back unless docker restarts it: the stack runs on regardless
    state = stack.engine.docker("inspect", "-f", "{{.State.Status}}", cid).stdout.strip()
    TIMINGS["killed_worker_state_after"] = state


def test_down_then_up_keeps_the_runs_and_a_rerun_runs_nothing(stack):
    before = stack.extra.get("quickstart_runs")
    assert before, "the quickstart test did not run first"
    t0 = time.monotonic()
    stack.compose("down", timeout=300)
    TIMINGS["compose_down_s"] = round(time.monotonic() - t0, 1)
    assert stack.compose("ps", "-q").stdout.split() == []
    TIMINGS["compose_up_again_s"] = round(stack.wait_until_up(), 1)

    runs = cell_runs(stack, QUICKSTART["name"])
    assert {r["info"]["run_id"]: r["info"]["end_time"] for r in runs} == before
    job, wall = submit_and_wait(stack, "sweeps/quickstart.yaml", cwd=REPO)
    TIMINGS["quickstart_rerun_s"] = round(wall, 1)
    runs = cell_runs(stack, QUICKSTART["name"])
    assert {r["info"]["run_id"]: r["info"]["end_time"] for r in runs} == before  # nothing ran


def test_the_trainer_image_runs_a_trainer_alone(engine, images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # the image runs as uid 1000
    steps = 60
    res = engine.docker("run", "--rm", "--network", "none", "-v", f"{out}:/out", IMAGE,
                        "python", "-m", "trainers.snap", "task=copy", "cell=gru", "hidden=8", "batch=4",
                        f"steps={steps}", "eval_every=20", "method=snap1", "--out", "/out/run",
                        timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line]
    assert lines and max(line.get("step", 0) for line in lines) == steps, lines[-2:]
    assert (out / "run" / "checkpoint.pt").stat().st_size > 0


def test_the_cuda_dockerfile_builds_on_a_stand_in_base(engine, images, tmp_path):
    """docker/Dockerfile.cuda, unchanged, on a stand-in of PyTorch's CUDA image (Python 3.11 and
    torch 2.13.0, the CPU build): its base checks, the locked install without torch, the
    project. The CUDA runtime itself cannot be pulled or run here."""
    from dockerenv import CUDA_IMAGE, build_cuda_image

    build_cuda_image(images)
    out = engine.docker("run", "--rm", "--network", "none", CUDA_IMAGE, "python", "-c",
                        "import torch, ray, mlflow, hpsweep; print(torch.__version__, ray.__version__, "
                        "mlflow.__version__, hpsweep.__version__)").stdout.split()
    assert out[0].split("+")[0] == "2.13.0" and out[1:] == ["2.60.0", "3.17.2", "0.1.0"], out
    # the base's torch was kept: one torch, the base's (pip did not replace it)
    hist = engine.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", CUDA_IMAGE).stdout
    assert "grep -v '^torch=='" in hist
    assert engine.docker("run", "--rm", "--network", "none", CUDA_IMAGE, "hpsweep", "--version").stdout.strip() \
        == "hpsweep 0.1.0"
