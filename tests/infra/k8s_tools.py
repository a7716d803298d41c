"""Offline checks of Kubernetes manifests: a small kustomize, and schema validation.

- :func:`kustomize_build` renders the subset of kustomize this repository uses (``resources``,
  ``namespace``, ``patches`` with a ``target`` and a JSON 6902 patch); any other key in a
  kustomization is refused, so the renderer cannot silently disagree with the real one.
- :func:`validate` checks one document: Kubernetes' own kinds with ``kubernetes-validate``
  (strict: unknown fields fail), KubeRay kinds against the CRD's ``openAPIV3Schema`` with
  ``jsonschema`` after translating the Kubernetes extensions; also strict.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import yaml

__all__ = [
    "REPO",
    "SCHEMAS",
    "KUBERNETES_VERSION",
    "load_documents",
    "kustomize_build",
    "crd_schema",
    "validate",
    "containers",
    "CLUSTER_SCOPED",
]

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
#: the Kubernetes release the manifests are checked against (kubernetes-validate bundles it)
KUBERNETES_VERSION = "1.37.0"
#: kinds without a namespace: kustomize's namespace transformer leaves them alone
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}
_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "namespace", "patches"}
_CRDS = {
    ("ray.io/v1", "RayCluster"): "ray.io_rayclusters.yaml",
    ("ray.io/v1", "RayJob"): "ray.io_rayjobs.yaml",
}


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    meta = doc.get("metadata", {})
    return all(
        (key == "kind" and doc.get("kind") == value)
        or (key == "name" and meta.get("name") == value)
        for key, value in target.items()
    )


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """Render a kustomization directory (the subset described in the module docstring)."""
    kfile = directory / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    unknown = set(k) - _KUSTOMIZATION_KEYS
    if unknown:
        raise ValueError(f"{kfile}: keys this renderer does not implement: {sorted(unknown)}")
    docs: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        docs.extend(kustomize_build(path) if path.is_dir() else load_documents(path))
    for patch in k.get("patches", []):
        if set(patch) - {"target", "patch", "path"} or "target" not in patch:
            raise ValueError(f"{kfile}: only JSON 6902 patches with a target are supported: {patch}")
        ops = yaml.safe_load(patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text())
        hits = [i for i, d in enumerate(docs) if _matches(d, patch["target"])]
        if not hits:
            raise ValueError(f"{kfile}: patch target {patch['target']} matches no resource")
        for i in hits:
            docs[i] = jsonpatch.apply_patch(docs[i], ops)  # raises on a path that is not there
    if "namespace" in k:
        for d in docs:
            if d.get("kind") not in CLUSTER_SCOPED:
                d.setdefault("metadata", {})["namespace"] = k["namespace"]
    return docs


# --- KubeRay CRDs as JSON Schema ------------------------------------------------------------


def _translate(node: Any) -> Any:
    """openAPIV3Schema -> JSON Schema: int-or-string, nullable, preserve-unknown, strict objects."""
    if isinstance(node, list):
        return [_translate(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _translate(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        t = out.get("type")
        if isinstance(t, str):
            out["type"] = [t, "null"]
    out.pop("nullable", None)
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        # the API server prunes unknown fields silently; a test should see them as typos
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    """The JSON Schema for a KubeRay kind, from the CRD in ``shared/schemas/kuberay``."""
    # the CRDs are megabytes of YAML: the C loader reads them ten times faster
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((SCHEMAS / _CRDS[(api_version, kind)]).read_text(), Loader=loader)
    version = api_version.split("/")[1]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = _translate(v["schema"]["openAPIV3Schema"])
            # apiVersion/kind/metadata are the API server's; check the common shape
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
            return schema
    raise KeyError(f"{kind} {api_version} not in the CRD")


def _errors(validator: jsonschema.Validator, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def validate(doc: dict[str, Any]) -> list[str]:
    """Every schema problem of one manifest document (empty when it is valid)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in _CRDS:
        schema = crd_schema(*key)
        problems = _errors(jsonschema.Draft7Validator(schema), doc)
        name = doc.get("metadata", {}).get("name", "")
        if not name or len(name) > 63:
            problems.append(f"metadata.name: {name!r} is not a valid name")
        return problems
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    try:
        kubernetes_validate.validate(copy.deepcopy(doc), KUBERNETES_VERSION, strict=True)
    except ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "<root>"
        return [f"{path}: {exc.message}"]
    return []


def containers(doc: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """Every container spec inside a manifest, wherever it sits (pod templates, Ray groups)."""
    stack: list[Any] = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    yield from (c for c in value if isinstance(c, dict) and "image" in c)
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
