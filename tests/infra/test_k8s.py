"""infra/k8s: every manifest and every rendered kustomization validates, and holds no secret."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from k8s_tools import REPO, containers, kustomize_build, load_documents, validate

K8S = REPO / "infra" / "k8s"
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
SECRET_NAME = "hpsweep-secrets"
SENSITIVE = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER", re.I)


def _id(p: Path) -> str:
    return str(p.relative_to(K8S))


def test_the_layout_is_there():
    names = {_id(p) for p in KUSTOMIZATIONS}
    assert {"base", "minio", "overlays/kind", "overlays/gpu-cloud"} <= names
    assert len(MANIFESTS) >= 6


@pytest.mark.parametrize("path", MANIFESTS, ids=_id)
def test_every_manifest_file_validates(path):
    docs = load_documents(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert validate(doc) == [], f"{_id(path)}: {doc['kind']} {doc['metadata']['name']}"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {_id(d): kustomize_build(d) for d in KUSTOMIZATIONS}


@pytest.mark.parametrize("name", [_id(p) for p in KUSTOMIZATIONS])
def test_every_rendered_kustomization_validates(rendered, name):
    docs = rendered[name]
    problems = {f"{d['kind']}/{d['metadata']['name']}": validate(d) for d in docs}
    assert {k: v for k, v in problems.items() if v} == {}
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "a resource is defined twice"


def test_the_validators_catch_mistakes(rendered):
    """Not vacuous: a typo in a RayCluster or a Deployment is reported."""
    ray = copy.deepcopy(next(d for d in rendered["base"] if d["kind"] == "RayCluster"))
    ray["spec"]["workerGroupSpecs"][1]["maxReplica"] = 3
    assert any("maxReplica" in p for p in validate(ray))
    ray = copy.deepcopy(next(d for d in rendered["base"] if d["kind"] == "RayCluster"))
    del ray["spec"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in p for p in validate(ray))
    dep = copy.deepcopy(next(d for d in rendered["base"] if d["kind"] == "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = ["Always"]
    assert validate(dep)
    dep = copy.deepcopy(next(d for d in rendered["base"] if d["kind"] == "Deployment"))
    dep["spec"]["replicas"] = "two"
    assert validate(dep)


def test_overlays_put_everything_in_one_namespace(rendered):
    for overlay in ("overlays/kind", "overlays/gpu-cloud"):
        docs = rendered[overlay]
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"hpsweep"}
        assert [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"] == ["hpsweep"]


def _raycluster(docs):
    (ray,) = [d for d in docs if d["kind"] == "RayCluster"]
    return ray


@pytest.mark.parametrize("overlay", ["base", "overlays/kind", "overlays/gpu-cloud"])
def test_raycluster_has_head_cpu_and_gpu_groups(rendered, overlay):
    ray = _raycluster(rendered[overlay])["spec"]
    assert ray["enableInTreeAutoscaling"] is True
    assert ray["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in ray["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0
    pod = gpu["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["image"].endswith("-cuda")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "nvidia.com/gpu" not in str(groups["cpu"]["template"])


def test_kind_has_minio_and_no_gpu_nodes_and_cloud_has_real_s3(rendered):
    kind, cloud = rendered["overlays/kind"], rendered["overlays/gpu-cloud"]
    settings = {o: next(d for d in docs if d["metadata"]["name"] == "hpsweep-settings")["data"]
                for o, docs in (("kind", kind), ("cloud", cloud))}
    assert settings["kind"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "AWS_ENDPOINT_URL" not in settings["cloud"]
    assert any(d["metadata"]["name"] == "minio" for d in kind)
    assert not any(d["metadata"]["name"].startswith("minio") for d in cloud)
    gpu = {g["groupName"]: g for g in _raycluster(kind)["spec"]["workerGroupSpecs"]}["gpu"]
    assert gpu["maxReplicas"] == 0
    # one image (the CUDA build) everywhere on the GPU cloud: same Python and Ray on every node
    assert {c["image"] for c in containers(_raycluster(cloud))} == {"ghcr.io/hpsweep/hpsweep:0.1.0-cuda"}


def test_mlflow_uses_postgres_and_serves_s3_artifacts(rendered):
    (dep,) = [d for d in rendered["base"] if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = " ".join(c["args"])
    assert "--backend-store-uri=postgresql+psycopg://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@postgres:5432/mlflow" in args
    assert "--serve-artifacts" in c["args"]
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in c["args"]
    # every $(VAR) the args use is defined in the container's environment
    defined = {e["name"] for e in c["env"]}
    settings = next(d for d in rendered["base"] if d["metadata"]["name"] == "hpsweep-settings")
    defined |= set(settings["data"])
    assert set(re.findall(r"\$\((\w+)\)", args)) <= defined
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered["base"]}
    assert {("StatefulSet", "postgres"), ("Service", "postgres"), ("Service", "mlflow")} <= kinds


def _env_entries(doc):
    for c in containers(doc):
        yield from c.get("env", [])


def test_no_secret_value_is_committed(rendered):
    example = (K8S / "secrets.example.env").read_text()
    example_keys = set(re.findall(r"^([A-Z_]+)=", example, re.M))
    assert example_keys == {"POSTGRES_USER", "POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert re.findall(r"^(?:POSTGRES_PASSWORD|AWS_SECRET_ACCESS_KEY)=(.+)$", example, re.M) == []
    assert "secrets.env" in (K8S / ".gitignore").read_text().split()
    refs = 0
    for docs in rendered.values():
        assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created by hand, never committed"
        for doc in docs:
            for e in _env_entries(doc):
                if SENSITIVE.search(e["name"]):
                    assert "value" not in e, f"{e['name']} has a literal value"
                    ref = e["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == SECRET_NAME and ref["key"] in example_keys
                    refs += 1
    assert refs >= 10
