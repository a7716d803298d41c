"""``hpsweep render rayjob``: every sweep in sweeps/ renders to manifests that validate."""

from __future__ import annotations

import importlib.metadata

import pytest
import yaml
from k8s_tools import REPO, containers, validate

from hpsweep import __version__
from hpsweep.cli import main
from hpsweep.cluster import render
from hpsweep.errors import UserError

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))

SLEEP_SWEEP = """\
name: Render_Test.gpu
trainer: sleep
config: {reports: 2, sleep: 0.0}
parameters:
  x: {grid: [0.0, 1.0]}
metric: {name: loss, mode: min}
resources: {cpus: 1, gpus: 0.25}
"""


def _cli(*argv: str) -> int:
    # the CLI's one user-error printer (render.py raises, prints nothing)
    return main(list(argv))


def test_the_repository_has_sweeps_to_render():
    assert SWEEPS, "sweeps/ holds no *.yaml: the render check below would check nothing"


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_renders_to_valid_manifests(sweep, tmp_path):
    out = tmp_path / "rayjob.yaml"
    assert _cli("render", "rayjob", str(sweep), "--tracking-uri", "http://mlflow:5000",
                "--storage", "s3://hpsweep/checkpoints", "-o", str(out)) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    for doc in docs:
        assert validate(doc) == [], doc["kind"]
    configmap, job = docs
    # the sweep travels verbatim, and the entrypoint runs it where the ConfigMap is mounted
    assert configmap["data"] == {sweep.name: sweep.read_text()}
    assert job["spec"]["entrypoint"].startswith(f"hpsweep run /sweeps/{sweep.name} --address auto")


def test_rayjob_shape(tmp_path):
    sweep = tmp_path / "gpu.yaml"
    sweep.write_text(SLEEP_SWEEP)
    cm, job = render.rayjob_manifests(
        sweep, tracking_uri="http://mlflow:5000", storage="s3://b/ckpt",
        s3_endpoint="http://minio:9000", namespace="research", max_gpu_workers=3,
    )
    for doc in (cm, job):
        assert validate(doc) == []
        assert doc["metadata"]["namespace"] == "research"
    assert job["metadata"]["name"] == "hpsweep-render-test-gpu"  # DNS-1123 from the sweep name
    spec = job["spec"]
    assert spec["entrypoint"] == ("hpsweep run /sweeps/gpu.yaml --address auto "
                                  "--tracking-uri http://mlflow:5000 --storage s3://b/ckpt "
                                  "--s3-endpoint http://minio:9000")
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == importlib.metadata.version("ray")
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 3)
    pod = gpu["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and pod["tolerations"]
    # a GPU sweep gets the CUDA image everywhere; the sweep file is mounted in every pod
    assert {c["image"] for c in containers(job)} == {f"ghcr.io/hpsweep/hpsweep:{__version__}-cuda"}
    for c in containers(job):
        env = {e["name"]: e for e in c["env"]}
        assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "hpsweep-secrets"
        assert {"name": "sweeps", "mountPath": "/sweeps", "readOnly": True} in c["volumeMounts"]


def test_cpu_sweep_gets_the_cpu_image_and_an_explicit_image_wins(tmp_path):
    sweep = tmp_path / "cpu.yaml"
    sweep.write_text(SLEEP_SWEEP.replace("gpus: 0.25", "gpus: 0"))
    _, job = render.rayjob_manifests(sweep)
    assert {c["image"] for c in containers(job)} == {f"ghcr.io/hpsweep/hpsweep:{__version__}"}
    _, job = render.rayjob_manifests(sweep, image="registry.example/me/hpsweep:dev")
    assert {c["image"] for c in containers(job)} == {"registry.example/me/hpsweep:dev"}
    assert "--tracking-uri" not in job["spec"]["entrypoint"]


def test_bad_sweep_is_a_user_error_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SLEEP_SWEEP.replace("trainer: sleep", "trainer: sleeep"))
    with pytest.raises(UserError):
        render.rayjob_manifests(bad)
    assert _cli("render", "rayjob", str(bad)) == 2
    err = capsys.readouterr().err
    assert "sleeep" in err and "Traceback" not in err
    assert _cli("render", "rayjob", str(tmp_path / "missing.yaml")) == 2
    assert "no such sweep file" in capsys.readouterr().err


def test_rendered_gpu_placement_and_secret_match_infra_k8s():
    """A RayJob and the long-lived RayCluster put GPU pods on the same nodes, read one Secret."""
    from k8s_tools import kustomize_build

    (ray,) = [d for d in kustomize_build(REPO / "infra" / "k8s" / "base") if d["kind"] == "RayCluster"]
    gpu = {g["groupName"]: g for g in ray["spec"]["workerGroupSpecs"]}["gpu"]["template"]["spec"]
    assert gpu["nodeSelector"] == render.GPU_NODE_SELECTOR
    assert gpu["tolerations"] == render.GPU_TOLERATIONS
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for c in containers(ray) for e in c["env"]
            if "valueFrom" in e}
    assert refs == {render.SECRET_NAME}
