"""``hpsweep render rayjob``: a sweep as a KubeRay RayJob, ready for ``kubectl apply -f``.

The output is two documents: a ConfigMap holding the sweep file, and a RayJob (``ray.io/v1``)
whose embedded RayCluster has a head (which runs the sweep's driver and no trials), a CPU
worker group and a GPU worker group that autoscales from zero on GPU nodes. The entrypoint is
the laptop's command, ``hpsweep run /sweeps/FILE --address auto``; tracking URI, storage and S3
endpoint reach every pod as environment variables; S3 credentials come from the Secret
``hpsweep-secrets`` (see ``infra/k8s``) and are never written into the manifest.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from hpsweep import __version__
from hpsweep.errors import SweepFileMissing, UsageError

__all__ = [
    "IMAGE_REPOSITORY",
    "SECRET_NAME",
    "GPU_NODE_SELECTOR",
    "GPU_TOLERATIONS",
    "default_image",
    "k8s_name",
    "rayjob_manifests",
    "to_yaml",
    "register",
]

#: the trainer image built from docker/ (tag = hpsweep's version; ``-cuda`` for the GPU build)
IMAGE_REPOSITORY = "ghcr.io/hpsweep/hpsweep"
#: the Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (infra/k8s/README.md creates it)
SECRET_NAME = "hpsweep-secrets"
#: where GPU pods go: the label GPU node pools carry (GKE, EKS and the NVIDIA GPU operator)
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
#: GPU nodes are usually tainted so that only pods asking for GPUs land there
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

_SWEEP_MOUNT = "/sweeps"


def default_image(gpu: bool) -> str:
    """The trainer image for this hpsweep version: the CUDA build when the sweep asks for GPUs."""
    return f"{IMAGE_REPOSITORY}:{__version__}{'-cuda' if gpu else ''}"


def k8s_name(name: str, prefix: str = "hpsweep-", limit: int = 47) -> str:
    """A DNS-1123 name from a sweep name (KubeRay derives pod names from it: keep it short)."""
    body = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return (prefix + body)[:limit].rstrip("-")


def _env(settings: dict[str, str]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(settings.items())]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        # optional: on clusters with instance roles / workload identity there is no Secret
        env.append({
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": key, "optional": True}},
        })
    return env


def _pod(
    container: str,
    image: str,
    settings: dict[str, str],
    config_map: str,
    resources: dict[str, dict[str, str]],
    ports: list[dict[str, Any]] | None = None,
    gpu: bool = False,
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": container,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": _env(settings),
        "resources": resources,
        "volumeMounts": [
            {"name": "sweeps", "mountPath": _SWEEP_MOUNT, "readOnly": True},
            # Ray's object store lives in /dev/shm; the container default (64 MiB) is too small
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    if ports:
        c["ports"] = ports
    spec: dict[str, Any] = {
        "containers": [c],
        "volumes": [
            {"name": "sweeps", "configMap": {"name": config_map}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if gpu:
        spec["nodeSelector"] = dict(GPU_NODE_SELECTOR)
        spec["tolerations"] = [dict(t) for t in GPU_TOLERATIONS]
    return {"spec": spec}


def rayjob_manifests(
    sweep: Path,
    *,
    image: str | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    s3_endpoint: str | None = None,
    namespace: str | None = None,
    max_cpu_workers: int = 4,
    max_gpu_workers: int = 4,
) -> list[dict[str, Any]]:
    """The ConfigMap and RayJob for ``sweep`` (validated first; a bad file raises SpecError)."""
    from hpsweep.spec.model import load_spec

    sweep = Path(sweep)
    if not sweep.is_file():
        raise SweepFileMissing(f"{sweep}: no such sweep file")
    spec = load_spec(sweep)
    ref = spec.trainer_info().ref
    local = [r.text for r in spec._requirements if r.path is not None]
    command = spec.trainer_info().module == "hpsweep.trainer.command"
    if (ref is not None and ref.source is not None) or local or command:
        what = ("a command trainer's directory" if command
                else f"trainer {ref.text}" if ref is not None and ref.source is not None else ", ".join(local))
        raise UsageError(f"{sweep}: {what}: a RayJob runs the code of its image and carries only the sweep "
                         "file; install the trainer (and local wheels) in the image and name it as a module, "
                         "or use `hpsweep submit`, which ships them")
    for flag, value in (("--max-cpu-workers", max_cpu_workers), ("--max-gpu-workers", max_gpu_workers)):
        if value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    gpu = spec.resources.gpus > 0
    image = image or default_image(gpu)
    name = k8s_name(spec.name)
    config_map = f"{name}-sweep"[:63]
    ray_version = importlib.metadata.version("ray")

    settings = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}
    flags = ["--address", "auto"]
    if tracking_uri:
        settings["MLFLOW_TRACKING_URI"] = tracking_uri
        flags += ["--tracking-uri", tracking_uri]
    if storage:
        settings["HPSWEEP_STORAGE"] = storage
        flags += ["--storage", storage]
    if s3_endpoint:
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
            settings[key] = s3_endpoint
        flags += ["--s3-endpoint", s3_endpoint]
    entrypoint = shlex.join(["hpsweep", "run", f"{_SWEEP_MOUNT}/{sweep.name}", *flags])

    labels = {"app.kubernetes.io/name": "hpsweep", "app.kubernetes.io/part-of": "hpsweep",
              "hpsweep/sweep": k8s_name(spec.name, prefix="", limit=63)}
    meta = {"name": name, "labels": labels}
    cm_meta = {"name": config_map, "labels": labels}
    if namespace:
        meta["namespace"] = cm_meta["namespace"] = namespace

    def req(cpu: str, memory: str, gpus: int = 0) -> dict[str, dict[str, str]]:
        r = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
        if gpus:
            r["requests"]["nvidia.com/gpu"] = r["limits"]["nvidia.com/gpu"] = str(gpus)
        return r

    head_ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    cluster = {
        "rayVersion": ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 60},
        # Ray 2.60 token authentication; KubeRay makes the token Secret and wires the pods
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            # the head runs the sweep's driver only: no trial is scheduled there
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod("ray-head", image, settings, config_map, req("2", "8Gi"), head_ports),
        },
        "workerGroupSpecs": [
            {
                "groupName": "cpu",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": max_cpu_workers,
                "rayStartParams": {},
                "template": _pod("ray-worker", image, settings, config_map, req("4", "16Gi")),
            },
            {
                "groupName": "gpu",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": max_gpu_workers,
                "rayStartParams": {},
                "template": _pod("ray-worker", image, settings, config_map,
                                 req("8", "32Gi", gpus=1), gpu=True),
            },
        ],
    }
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": meta,
        "spec": {
            "entrypoint": entrypoint,
            "submissionMode": "K8sJobMode",
            # the sweep resumes from MLflow + storage; a retried job would just re-run the rest
            "backoffLimit": 0,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": cluster,
        },
    }
    if spec._requirements:  # installed on the nodes by Ray's runtime environment
        rayjob["spec"]["runtimeEnvYAML"] = yaml.safe_dump({"pip": [r.text for r in spec._requirements]})
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": cm_meta,
        "data": {sweep.name: sweep.read_text()},
    }
    return [configmap, rayjob]


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the embedded sweep file) as readable ``|`` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """Documents as one multi-document YAML stream, keys in the order built."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         width=100)


def _render_rayjob(args: argparse.Namespace) -> int:
    docs = rayjob_manifests(
        Path(args.sweep),
        image=args.image,
        tracking_uri=args.tracking_uri,
        storage=args.storage,
        s3_endpoint=args.s3_endpoint,
        namespace=args.namespace,
        max_cpu_workers=args.max_cpu_workers,
        max_gpu_workers=args.max_gpu_workers,
    )
    text = to_yaml(docs)
    if args.output and args.output != "-":
        Path(args.output).write_text(text)
        print(f"hpsweep: wrote {args.output}; apply it with `kubectl apply -f {args.output}`",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def register(subparsers: Any) -> None:
    """Add ``render rayjob`` to the CLI's argparse subparsers."""
    p = subparsers.add_parser("render", help="write deployment manifests for a sweep")
    kinds = p.add_subparsers(dest="render_kind", metavar="KIND", required=True)
    r = kinds.add_parser(
        "rayjob",
        help="a KubeRay RayJob (+ ConfigMap with the sweep) for kubectl apply",
        description="Write a KubeRay RayJob that runs SWEEP.yaml on its own autoscaling "
        "RayCluster (head, CPU group, GPU group from zero).",
    )
    r.add_argument("sweep", metavar="SWEEP.yaml")
    r.add_argument("--image", help=f"trainer image (default: {default_image(False)})"
                   ", or the -cuda tag when the sweep asks for GPUs")
    r.add_argument("--tracking-uri", help="MLflow tracking server as the pods reach it, "
                   "e.g. http://mlflow:5000")
    r.add_argument("--storage", help="checkpoint storage, e.g. s3://hpsweep/checkpoints")
    r.add_argument("--s3-endpoint", help="S3 endpoint for MinIO, e.g. http://minio:9000")
    r.add_argument("--namespace", help="metadata.namespace of the manifests")
    r.add_argument("--max-cpu-workers", type=int, default=4, help="CPU worker pods at most")
    r.add_argument("--max-gpu-workers", type=int, default=4, help="GPU worker pods at most")
    r.add_argument("-o", "--output", help="file to write (default: stdout)")
    r.set_defaults(func=_render_rayjob)
