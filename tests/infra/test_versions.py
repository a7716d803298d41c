"""Drift: torch, Ray, MLflow and the image tags agree across pyproject.toml, requirements.lock,
docker/, infra/ and ``hpsweep render``. Change a version in one place and this fails."""

from __future__ import annotations

import re

import yaml
from k8s_tools import REPO, containers, kustomize_build
from pins import IMAGE, MLFLOW_IMAGE, base_image, lock_pins, project_version, pyproject_pins

import hpsweep
from hpsweep.cluster import render

DOCKER = REPO / "docker"
#: every text file that names an image or a version (manifests, compose, launcher, Dockerfiles)
FILES = sorted(
    [*REPO.joinpath("infra").rglob("*.yaml"), *DOCKER.glob("Dockerfile*"), DOCKER / "compose.yaml"]
)


def test_the_three_pins_are_exact_and_the_lock_agrees():
    pins, lock = pyproject_pins(), lock_pins()
    for name in ("torch", "ray", "mlflow"):
        assert name in pins, f"pyproject.toml does not pin {name} exactly"
        assert lock[name].split("+")[0] == pins[name], f"requirements.lock: {name}=={lock[name]}"
    assert hpsweep.__version__ == project_version()


def test_every_hpsweep_image_reference_carries_the_project_version():
    version = project_version()
    allowed = {f"{IMAGE}:{version}", f"{IMAGE}:{version}-cuda"}
    seen = set()
    for path in FILES:
        for ref in re.findall(rf"{re.escape(IMAGE)}(?::[\w.-]+)?", path.read_text()):
            assert ref in allowed, f"{path.relative_to(REPO)}: {ref} (expected one of {sorted(allowed)})"
            seen.add(ref)
    assert seen == allowed  # both builds are used somewhere
    assert {render.default_image(False), render.default_image(True)} == allowed


def test_mlflow_image_and_server_match_the_mlflow_pin():
    mlflow = pyproject_pins()["mlflow"]
    refs = set()
    for path in FILES:
        refs |= set(re.findall(rf"{re.escape(MLFLOW_IMAGE)}:[\w.-]+", path.read_text()))
    assert refs == {f"{MLFLOW_IMAGE}:{mlflow}"}
    # the server is installed at the pin, on the trainer image's Python, its dependencies locked
    text = (DOCKER / "Dockerfile.mlflow").read_text()
    assert base_image(text) == base_image((DOCKER / "Dockerfile").read_text())
    assert "-c /tmp/requirements.lock -r /tmp/mlflow-requirements.txt" in text
    reqs = (DOCKER / "mlflow-requirements.txt").read_text().split()
    assert f"mlflow=={mlflow}" in reqs


def test_dockerfiles_install_the_pinned_versions():
    pins = pyproject_pins()
    cpu = (DOCKER / "Dockerfile").read_text()
    cuda = (DOCKER / "Dockerfile.cuda").read_text()
    for text in (cpu, cuda):
        assert "requirements.lock" in text and re.search(r"pip install[^\n]*-r ", text)
        assert f"HPSWEEP_VERSION={project_version()}" in text
    # the CUDA build takes torch from PyTorch's image, whose tag must be the pinned torch,
    # and keeps it (the lock's CPU wheel is filtered out)
    base = base_image(cuda)
    assert base.startswith(f"pytorch/pytorch:{pins['torch']}-cuda") and base.endswith("-runtime")
    assert "grep -v '^torch=='" in cuda
    assert f"== '{pins['torch']}'" in cuda
    # Ray needs one Python on every node: the CPU base and the CUDA check name the same one
    py = re.fullmatch(r"python:(\d+)\.(\d+)\S*", base_image(cpu)).groups()
    assert f"sys.version_info[:2] == ({py[0]}, {py[1]})" in cuda
    requires = re.search(r'requires-python\s*=\s*">=(\d+)\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert tuple(map(int, py)) >= tuple(map(int, requires.groups()))


def test_ray_version_in_manifests_and_render_matches_the_pin(tmp_path):
    ray = pyproject_pins()["ray"]
    versions = set()
    for overlay in ("base", "overlays/kind", "overlays/gpu-cloud"):
        for doc in kustomize_build(REPO / "infra" / "k8s" / overlay):
            if doc["kind"] == "RayCluster":
                versions.add(doc["spec"]["rayVersion"])
    assert versions == {ray}
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\ntrainer: sleep\nmetric: {name: loss, mode: min}\n")
    _, job = render.rayjob_manifests(sweep)
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray


def test_no_image_floats():
    """Every image everywhere has an explicit tag, never ``latest``."""
    images = []
    for path in FILES:
        text = path.read_text()
        if path.name.startswith("Dockerfile"):
            images.append(base_image(text))
        else:
            for doc in yaml.safe_load_all(text):
                images += [c["image"] for c in containers(doc or {})]
                images += [s["image"] for s in (doc or {}).get("services", {}).values()]
                if isinstance((doc or {}).get("docker"), dict):
                    images.append(doc["docker"]["image"])
    assert len(images) >= 10
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, image
