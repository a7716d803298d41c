"""Sweeps on a Ray cluster through the Ray Jobs API: ``submit``, ``logs``, ``stop``, ``status``.

A submitted sweep is one Ray job whose entrypoint is ``hpsweep run SWEEP.yaml --address auto``:
the same command a laptop runs, executed on the head node, with Ray Tune spreading the trials
over the cluster's workers by their resources. The sweep file travels in the job's runtime
environment (the working directory), or, where the cluster runs containers (``--image``), in
an environment variable written to a file by the entrypoint. The working directory shipped is
an allow-list (``stage_working_dir``): the ``hpsweep`` and ``trainers`` packages, the sweep
file and the files it names inside the project, its trainer, a command trainer's directory;
credential files (``.env``, ``.netrc``, ``id_rsa``, ``.aws/``...) are never shipped.

Tracking URI, storage and S3 endpoint are what the cluster's nodes see: given as flags, they
reach the job as flags and environment variables; left out, the nodes' own environment decides
(the compose stack and infra/k8s set it). Credentials never travel with a job: the nodes have
their own (Kubernetes Secrets, instance roles).

Authentication: Ray 2.60 clusters use token authentication. The token is read, in order, from
``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``, and sent
as a bearer token; ``RAY_AUTH_MODE=disabled`` sends none.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpsweep.cluster.shipping import WORKING_DIR_EXCLUDES, command_dirs, no_credentials, shipped_with, stage_working_dir
from hpsweep.errors import ClusterError, SweepFileMissing, UnknownJob, UsageError
from hpsweep.store.mlflow import TAG  # a job is labelled with its sweep as its runs are

__all__ = [
    "register",
    "job_status",
    "submit",
    "build_submission",
    "resolve_address",
    "auth_headers",
    "ADDRESS_ENV_VARS",
]

#: where ``--address`` comes from when it is not given, first found wins
ADDRESS_ENV_VARS = ("HPSWEEP_RAY_ADDRESS", "RAY_ADDRESS")

_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


# --- helpers -------------------------------------------------------------------------------


def resolve_address(address: str | None) -> str:
    """The Jobs API address: the flag, else ``HPSWEEP_RAY_ADDRESS``, else ``RAY_ADDRESS``."""
    if address:
        return address.rstrip("/")
    for name in ADDRESS_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name].rstrip("/")
    raise UsageError(
        "no cluster address: pass --address http://HEAD:8265 "
        "(or set HPSWEEP_RAY_ADDRESS / RAY_ADDRESS)"
    )


def auth_headers() -> dict[str, str]:
    """The bearer-token header for a cluster with token authentication, or ``{}``.

    Ray's client only sends a token when ``RAY_AUTH_MODE=token`` is set in the submitting shell;
    sending the token whenever one is available lets ``hpsweep submit`` work with just the token
    file, as ``ray start`` does.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        try:
            token = path.read_text().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client(address: str):
    """A ``JobSubmissionClient``; connection and authentication problems become UserErrors."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except AuthenticationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ClusterError(
            f"{address}: {first}; put the cluster's token in ~/.ray/auth_token, "
            "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN"
        ) from None
    except (ConnectionError, OSError) as exc:
        raise ClusterError(
            f"cannot reach the Ray Jobs API at {address}: {exc} "
            "(is the cluster up, and the dashboard port 8265 forwarded?)"
        ) from None
    except ValueError as exc:  # an address Ray cannot parse
        raise UsageError(f"bad cluster address {address!r}: {exc}") from None


def _call(client: Any, address: str, job_id: str, fn: Callable[[], Any]) -> Any:
    """Run a client call; an unknown job id becomes :class:`UnknownJob`, a lost connection a
    :class:`ClusterError`. Ray's client raises a bare RuntimeError for any refused request, so
    whether the job exists is asked of the cluster, never read from the error's text."""
    try:
        return fn()
    except RuntimeError:
        try:
            known = {j.submission_id or j.job_id for j in client.list_jobs()}
        except (RuntimeError, ConnectionError):
            known = {job_id}  # cannot tell: let the original error through
        if job_id not in known:
            raise UnknownJob(f"no job {job_id!r} on {address} "
                             f"(`hpsweep status --address {address}` lists them)") from None
        raise
    except ConnectionError as exc:
        raise ClusterError(f"lost the Ray Jobs API at {address}: {exc}") from None


def _no_local_store(tracking_uri: str | None, storage: str | None) -> None:
    """A tracking file or storage directory given to ``submit`` would be a path on the cluster's
    nodes, inside the job's temporary working directory when relative: refused. Left out, the
    nodes' own settings decide, and the job itself refuses local ones (``run --address``)."""
    from hpsweep.run import preflight

    if tracking_uri:
        preflight.check_tracking_uri(tracking_uri)
    given_tracking = tracking_uri if tracking_uri and preflight.local_tracking_path(tracking_uri) else None
    given_storage = storage if storage and preflight.local_storage_path(storage) else None
    if given_tracking or given_storage:
        preflight.check_cluster_locations(
            given_tracking or "http://unused", given_storage or "s3://unused",
            where="a path given to submit is a path on the cluster's nodes (inside the job's "
                  "temporary working directory when relative)")


# --- submit ----------------------------------------------------------------------------------


def _submission_id(name: str) -> str:
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:40]
    return f"hpsweep-{safe}-{stamp}-{secrets.token_hex(2)}"


def build_submission(
    sweep: Path,
    *,
    tracking_uri: str | None = None,
    storage: str | None = None,
    s3_endpoint: str | None = None,
    image: str | None = None,
    working_dir: Path | None = None,
    pip: list[str] | None = None,
    allow_local_store: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
    node_wait: float | None = None,
) -> dict[str, Any]:
    """Validate ``sweep`` and build ``JobSubmissionClient.submit_job``'s keyword arguments.

    Raises a :class:`hpsweep.errors.UserError` (``SpecError`` for a bad sweep file) before
    anything is sent.
    """
    from hpsweep.spec.model import load_spec  # lazily: ``hpsweep logs`` needs no spec machinery
    from hpsweep.spec.requirements import runtime_env as requirements_env
    from hpsweep.trainer.data import SHIPPED_FROM

    sweep = Path(sweep)
    if not sweep.is_file():
        raise SweepFileMissing(f"{sweep}: no such sweep file")
    spec = load_spec(sweep, overrides)  # raises SpecError listing every problem
    no_credentials("--tracking-uri", tracking_uri)
    no_credentials("--storage", storage)
    if not allow_local_store:
        _no_local_store(tracking_uri, storage)

    # only what the flags say: the submitting shell's own settings (a laptop's localhost
    # tracking URI) mean nothing on the cluster, whose nodes carry their own environment
    env_vars: dict[str, str] = {}
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    if storage:
        env_vars["HPSWEEP_STORAGE"] = storage
    if s3_endpoint:
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
            env_vars[name] = s3_endpoint
    env_vars.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env_vars.setdefault("PYTHONUNBUFFERED", "1")
    # `hpsweep run` gives its trials a runtime_env of its own (ray.init); Ray refuses a driver
    # runtime_env that repeats a key of the job's unless told to merge them, the driver's winning
    env_vars["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"

    flags = ["--address", "auto"]
    if tracking_uri:
        flags += ["--tracking-uri", tracking_uri]
    if storage:
        flags += ["--storage", storage]
    if s3_endpoint:
        flags += ["--s3-endpoint", s3_endpoint]
    if allow_local_store:
        flags += ["--allow-local-store"]
    if node_wait is not None:
        flags += ["--node-wait", f"{node_wait:g}"]
    for override in overrides:  # the job validates and runs the same sweep as here
        flags += ["--set", override]

    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if image:
        # Ray runs image_uri jobs with env_vars only: the sweep travels as text, and the
        # entrypoint writes it to a file inside the container before running it
        if pip or working_dir:
            raise UsageError("--image runs the code inside the image: drop --pip and --working-dir")
        info = spec.trainer_info()
        if spec.requirements or (info.ref is not None and info.ref.source is not None) \
                or info.module == "hpsweep.trainer.command":
            raise UsageError(f"{sweep}: --image runs the code inside the image, and this sweep's trainer "
                             "(a file or directory, a command's directory) or its requirements would not "
                             "travel with it: build them into the image and name the trainer as a module, "
                             "or drop --image")
        runtime_env["image_uri"] = image
        env_vars["HPSWEEP_SWEEP_YAML"] = sweep.read_text()
        target = f"/tmp/hpsweep-{sweep.name}"
        run = shlex.join(["hpsweep", "run", target, *flags])
        script = f'printf %s "$HPSWEEP_SWEEP_YAML" > {shlex.quote(target)} && exec {run}'
        entrypoint = f"sh -c {shlex.quote(script)}"
    else:
        root = (working_dir or Path.cwd()).resolve()
        if not root.is_dir():
            raise UsageError(f"--working-dir {root}: not a directory")
        try:
            relative = sweep.resolve().relative_to(root)
        except ValueError:
            raise UsageError(
                f"{sweep}: the sweep file must be inside the working directory {root} "
                "that is shipped to the cluster (pass --working-dir)"
            ) from None
        staged, stripped, links = stage_working_dir(root, sweep, spec, shipped_with(spec, root),
                                                    command_dirs(spec, root))
        if stripped:
            print(f"hpsweep: left out of the job (credentials never travel with it): "
                  f"{', '.join(sorted(stripped))}", file=sys.stderr)
        if links:
            print(f"hpsweep: left out of the job (symbolic links are not shipped): {', '.join(links)}",
                  file=sys.stderr)
        # on the nodes, an absolute path under root means the node's copy (hpsweep.trainer.data.relocate)
        env_vars[SHIPPED_FROM] = str(root)
        runtime_env.update(working_dir=str(staged), excludes=list(WORKING_DIR_EXCLUDES))
        # Ray's runtime environment installs them on every node the job uses
        runtime_env.update(requirements_env(list(spec._requirements), root, staged))
        if pip:
            runtime_env["pip"] = runtime_env.get("pip", []) + list(pip)
        entrypoint = shlex.join(["hpsweep", "run", relative.as_posix(), *flags])

    return {
        "entrypoint": entrypoint,
        "submission_id": _submission_id(spec.name),
        "runtime_env": runtime_env,
        "metadata": {TAG["sweep"]: spec.name, "hpsweep.file": sweep.name},
    }


def submit(args: argparse.Namespace) -> int:
    """``hpsweep submit``: validate the sweep, submit it as a Ray job, print the job id."""
    address = resolve_address(args.address)
    submission = build_submission(
        Path(args.sweep),
        tracking_uri=args.tracking_uri,
        storage=args.storage,
        s3_endpoint=args.s3_endpoint,
        image=args.image,
        working_dir=Path(args.working_dir) if args.working_dir else None,
        pip=args.pip,
        allow_local_store=args.allow_local_store,
        overrides=args.overrides,
        node_wait=args.node_wait,
    )
    staged = submission["runtime_env"].get("working_dir")
    try:
        client = _client(address)
        try:
            job_id = client.submit_job(**submission)  # uploads the working directory
        except RuntimeError as exc:  # the Jobs API refused it (e.g. a runtime_env it cannot build)
            raise ClusterError(f"{address} refused the job: {exc}") from None
    finally:
        if staged and Path(staged).name.startswith("hpsweep-job-"):
            import shutil

            shutil.rmtree(staged, ignore_errors=True)
    print(job_id)
    print(
        f"hpsweep: submitted {submission['metadata'][TAG['sweep']]} to {address}; "
        f"follow it with `hpsweep logs {job_id} --follow --address {address}`",
        file=sys.stderr,
    )
    print(
        f"hpsweep: runs go to {args.tracking_uri or '$MLFLOW_TRACKING_URI as set on the cluster nodes'}, "
        f"checkpoints to {args.storage or '$HPSWEEP_STORAGE as set on the cluster nodes'}",
        file=sys.stderr,
    )
    if args.follow:
        return _follow(client, address, job_id)
    return 0


# --- logs, stop, status ----------------------------------------------------------------------


def _follow(client: Any, address: str, job_id: str) -> int:
    """Stream the job's logs until it ends; exit 0 if it succeeded, 1 otherwise."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    _call(client, address, job_id, lambda: client.get_job_status(job_id))  # unknown id: a clean error
    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        return 130
    status = _wait_terminal(client, address, job_id, timeout=30)
    print(f"hpsweep: job {job_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _wait_terminal(client: Any, address: str, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(_call(client, address, job_id, lambda: client.get_job_status(job_id)).value)
        if status in _TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def logs(args: argparse.Namespace) -> int:
    """``hpsweep logs JOB [--follow]``: print (or stream) a job's driver log."""
    address = resolve_address(args.address)
    client = _client(address)
    if args.follow:
        return _follow(client, address, args.job)
    sys.stdout.write(_call(client, address, args.job, lambda: client.get_job_logs(args.job)))
    return 0


def stop(args: argparse.Namespace) -> int:
    """``hpsweep stop JOB``: ask Ray to stop the job and wait until it has stopped."""
    address = resolve_address(args.address)
    client = _client(address)
    _call(client, address, args.job, lambda: client.stop_job(args.job))
    status = _wait_terminal(client, address, args.job, timeout=args.timeout)
    print(f"{args.job} {status}")
    return 0 if status in _TERMINAL else 1


def _fmt_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return _dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def job_status(address: str | None, job_id: str | None) -> int:
    """Print the cluster's submitted jobs as a table, or one job's status; return the exit code."""
    address = resolve_address(address)
    client = _client(address)
    if job_id is None:
        jobs = [j for j in _call(client, address, "", client.list_jobs) if j.submission_id]
        jobs.sort(key=lambda j: j.start_time or 0)
        rows = [
            [
                j.submission_id,
                str(j.status.value),
                (j.metadata or {}).get(TAG["sweep"], "-"),
                _fmt_time(j.start_time),
                _fmt_time(j.end_time),
            ]
            for j in jobs
        ]
        if not rows:
            print(f"no jobs on {address}")
        else:
            print(_table(rows, ["JOB", "STATUS", "SWEEP", "STARTED", "ENDED"]))
        return 0
    info = _call(client, address, job_id, lambda: client.get_job_info(job_id))
    print(f"job:        {job_id}")
    print(f"status:     {info.status.value}")
    print(f"sweep:      {(info.metadata or {}).get(TAG['sweep'], '-')}")
    print(f"entrypoint: {info.entrypoint}")
    print(f"started:    {_fmt_time(info.start_time)}")
    print(f"ended:      {_fmt_time(info.end_time)}")
    if info.message:
        print(f"message:    {info.message}")
    if str(info.status.value) == "RUNNING":
        waiting = _waiting_line(_call(client, address, job_id, lambda: client.get_job_logs(job_id)))
        if waiting:
            print(f"waiting:    {waiting}")
    return 0


def _waiting_line(log: str) -> str | None:
    """What a running sweep's driver waits for, from its log (see hpsweep.run.resources): its
    last "waiting for a node ..." line, unless a node came since."""
    for line in reversed(log.splitlines()):
        if line.startswith("a node can hold the trials now"):
            return None
        if line.startswith("waiting for a node with "):
            return line
    return None


# --- argparse ----------------------------------------------------------------------------------


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="Ray Jobs API, e.g. http://HEAD:8265 (default: $HPSWEEP_RAY_ADDRESS or $RAY_ADDRESS)",
    )


def register(subparsers: Any) -> None:
    """Add ``submit``, ``logs``, ``stop`` and ``render`` to the CLI's argparse subparsers."""
    from hpsweep.cluster import render as _render

    p = subparsers.add_parser(
        "submit",
        help="submit a sweep to a Ray cluster as a Ray job",
        description="Validate SWEEP.yaml here, then run `hpsweep run SWEEP.yaml --address auto` "
        "on the cluster through the Ray Jobs API. Prints the job id.",
    )
    p.add_argument("sweep", metavar="SWEEP.yaml")
    _add_address(p)
    p.add_argument("--tracking-uri", help="MLflow tracking server as the cluster reaches it "
                   "(default: the cluster nodes' own $MLFLOW_TRACKING_URI)")
    p.add_argument("--storage", help="checkpoint storage, e.g. s3://bucket/prefix "
                   "(default: the cluster nodes' own $HPSWEEP_STORAGE)")
    p.add_argument("--s3-endpoint", help="S3 endpoint as the cluster reaches it, for MinIO "
                   "(default: the cluster nodes' own $AWS_ENDPOINT_URL)")
    p.add_argument("--image", help="run the job inside this container image "
                   "(clusters that run containers); the sweep file travels with the job")
    p.add_argument("--working-dir", help="directory shipped to the cluster (default: the "
                   "current one); must contain the sweep file")
    p.add_argument("--pip", nargs="+", metavar="REQ", help="extra pip requirements for the job")
    p.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    p.add_argument("--allow-local-store", action="store_true",
                   help="allow a tracking file or storage directory on the nodes' disks "
                        "(only when every node shares that disk and it outlives the job)")
    p.add_argument("--node-wait", type=float, default=None, metavar="SECONDS",
                   help="how long the job waits for a node that can hold a trial before it stops, "
                        "leaving the cells pending (default: $HPSWEEP_NODE_WAIT on the head, else 1800)")
    p.set_defaults(func=submit)

    p = subparsers.add_parser("logs", help="print a cluster job's log")
    p.add_argument("job", metavar="JOB")
    _add_address(p)
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    p.set_defaults(func=logs)

    p = subparsers.add_parser("stop", help="stop a cluster job")
    p.add_argument("job", metavar="JOB")
    _add_address(p)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to stop")
    p.set_defaults(func=stop)

    _render.register(subparsers)
