"""docker/ and infra/ray/: Dockerfiles lint clean, the compose stack and the Ray cluster
launcher config hang together (images, ports, versions, variables)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from k8s_tools import REPO
from pins import IMAGE, MLFLOW_IMAGE, project_version, pyproject_pins

DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
HADOLINT = Path(sys.executable).with_name("hadolint")


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    out = _hadolint(dockerfile)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\nRUN cd /tmp\n")
    out = _hadolint(bad)
    assert out.returncode != 0
    assert "DL3006" in out.stdout and "DL3003" in out.stdout  # untagged base; cd in RUN


def test_dockerfiles_copy_the_code_and_run_hpsweep():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile", "Dockerfile.cuda", "Dockerfile.mlflow"}
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DOCKER / name).read_text()
        for part in ("hpsweep", "trainers", "pyproject.toml", "requirements.lock"):
            assert re.search(rf"^COPY {re.escape(part)}\b", text, re.M), f"{name} does not COPY {part}"
        assert 'CMD ["hpsweep", "--help"]' in text
        assert re.search(r"^USER 1000$", text, re.M)
    ignored = (REPO / ".dockerignore").read_text().split()
    for never in (".git", ".venv", "docker/.env", "**/secrets.env"):
        assert never in ignored


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_stack_has_every_service_with_pinned_images(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "create-bucket", "mlflow", "ray-head", "ray-worker"}
    version, mlflow = project_version(), pyproject_pins()["mlflow"]
    assert services["ray-head"]["image"] == services["ray-worker"]["image"] == f"{IMAGE}:{version}"
    assert services["ray-head"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert services["mlflow"]["image"] == f"{MLFLOW_IMAGE}:{mlflow}"
    assert services["ray-worker"]["deploy"]["replicas"] >= 2
    # MLflow: PostgreSQL store, S3 (MinIO) artifacts served through the server
    cmd = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri=postgresql+psycopg://" in cmd and "@postgres:5432/mlflow" in cmd
    assert "--serve-artifacts" in cmd and "--artifacts-destination=s3://hpsweep/" in cmd
    bucket_cmd = " ".join(services["create-bucket"]["entrypoint"])
    assert "mc mb --ignore-existing local/hpsweep" in bucket_cmd
    assert services["mlflow"]["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    # the nodes know where MLflow and S3 are, by service name
    env = services["ray-worker"]["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["HPSWEEP_STORAGE"].startswith("s3://hpsweep/")


def test_compose_ports_are_loopback_only_and_match_the_servers(compose):
    published, port_vars = {}, set()
    for name, svc in compose["services"].items():
        for p in svc.get("ports", []):
            # 127.0.0.1:${VAR:-DEFAULT}:PORT -- the host port can be moved in docker/.env
            m = re.fullmatch(r"([\d.]+):(?:\$\{(\w+):-(\d+)\}|(\d+)):(\d+)", p)
            assert m, f"{name}: unexpected port mapping {p}"
            assert m.group(1) == "127.0.0.1", f"{name} publishes {p} on every interface"
            published[name, int(m.group(5))] = int(m.group(3) or m.group(4))
            if m.group(2):
                port_vars.add(m.group(2))
    assert published == {("minio", 9000): 9000, ("minio", 9001): 9001,
                         ("mlflow", 5000): 5000, ("ray-head", 8265): 8265}
    # the port variables are documented in env.example
    assert port_vars <= set(re.findall(r"^#?\s*(\w+)=", (DOCKER / "env.example").read_text(), re.M))
    head = " ".join(compose["services"]["ray-head"]["command"])
    assert "--dashboard-port=8265" in head and "--port=6379" in head
    assert "--address=ray-head:6379" in compose["services"]["ray-worker"]["command"]
    assert "--port=5000" in compose["services"]["mlflow"]["command"]


def test_compose_secrets_come_from_the_env_file(compose):
    text = (DOCKER / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = (DOCKER / "env.example").read_text()
    keys = dict(re.findall(r"^(\w+)=(.*)$", example, re.M))
    assert required <= set(keys), required - set(keys)
    for secret in ("POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"):
        assert secret in required and keys[secret] == ""  # required, and no value committed
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((REPO / "infra" / "ray" / "aws-gpu.yaml").read_text())


def test_launcher_config_validates_against_rays_schema(launcher):
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    assert list(jsonschema.Draft7Validator(schema).iter_errors(launcher)) == []
    broken = {**launcher, "max_worker": 3}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


def test_launcher_runs_the_trainer_image_with_spot_gpus_and_on_demand_fallback(launcher):
    assert launcher["docker"]["image"] == f"{IMAGE}:{project_version()}-cuda"
    assert launcher["provider"]["type"] == "aws"
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and "InstanceMarketOptions" not in head["node_config"]
    spot = types["gpu_spot"]
    ondemand = types["gpu_ondemand"]
    assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in ondemand["node_config"]
    assert spot["node_config"]["InstanceType"] == ondemand["node_config"]["InstanceType"]
    assert spot["resources"]["GPU"] == ondemand["resources"]["GPU"] >= 1
    assert spot["min_workers"] == ondemand["min_workers"] == 0  # autoscaling from zero
    assert launcher["idle_timeout_minutes"] > 0
    assert sum(t.get("max_workers", 0) for t in types.values()) <= launcher["max_workers"]
