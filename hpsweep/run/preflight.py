"""What can be checked before anything is launched: the tracking URI, the storage, the data a
sweep names, and, for a sweep on a cluster, that its runs and checkpoints land where every
node (and the user, afterwards) can reach them.

Each check raises :class:`hpsweep.errors.Unusable` (a ``UserError``: exit 2) with one sentence
saying what is wrong and what to give instead; none of them creates anything where the answer
is no.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from hpsweep.errors import Unusable

__all__ = [
    "check_tracking_uri",
    "check_local_storage",
    "check_data",
    "local_tracking_path",
    "local_storage_path",
    "check_cluster_locations",
]

#: database drivers MLflow's SQLAlchemy store needs, by URI scheme (``scheme+driver`` names one)
_DB_DRIVERS = {
    "postgresql": ("psycopg", "psycopg[binary]"),   # MLflow 3 uses psycopg 3 by default
    "mysql": ("pymysql", "pymysql"),
    "mssql": ("pyodbc", "pyodbc"),
}
_DRIVER_MODULES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "pymysql": "pymysql",
                   "mysqldb": "mysqlclient", "pyodbc": "pyodbc"}

_HINT = ("give an MLflow server (http://HOST:5000), a SQLite file (sqlite:///PATH/mlflow.db) "
         "or a database (postgresql://USER@HOST/DB), or leave --tracking-uri out for "
         ".hpsweep/mlflow.db")


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_dir(path: Path, what: str, fix: str) -> None:
    """``path`` is, or can be made, a directory this process can write; nothing is left
    behind when it cannot."""
    existing = _first_existing(path)
    if not existing.is_dir():
        raise Unusable(f"{what}: {existing} is a file, not a directory; {fix}")
    created: list[Path] = []
    probe = path / f".hpsweep-probe-{uuid.uuid4().hex}"
    try:
        for parent in reversed([path, *path.parents]):
            if not parent.exists():
                parent.mkdir()
                created.append(parent)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        for made in reversed(created):
            try:
                made.rmdir()
            except OSError:
                pass
        reason = exc.strerror or str(exc)
        raise Unusable(f"{what}: cannot write to {path} ({reason}); {fix}") from None


def check_tracking_uri(uri: str, flag: str = "--tracking-uri") -> None:
    """Refuse a tracking URI MLflow cannot use here, before any run is created.

    ``http(s)://`` is checked by the CLI (the server must answer); ``databricks`` is passed on.
    """
    scheme = urlsplit(uri).scheme.lower() if "://" in uri or uri.startswith(("sqlite:", "file:")) else ""
    base, _, driver = scheme.partition("+")
    if base in ("http", "https", "databricks", "databricks-uc", "uc"):
        return
    if base == "sqlite":
        if not uri.startswith("sqlite:///") or uri == "sqlite:///":
            raise Unusable(f"{flag} {uri}: an in-memory or hostless SQLite URI keeps nothing; "
                            f"give sqlite:///PATH/mlflow.db (sqlite:////ABS/PATH.db for an absolute path)")
        path = Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser()
        if path.is_dir():
            raise Unusable(f"{flag} {uri}: {path} is a directory; name the database file in it, "
                            f"e.g. sqlite:///{path / 'mlflow.db'}")
        parent = path.absolute().parent
        from hpsweep.store.mlflow import DEFAULT_DIR

        if parent == Path(DEFAULT_DIR).resolve():   # the default store: made by its first client
            parent = _first_existing(parent)
        elif not parent.is_dir():
            raise Unusable(f"{flag} {uri}: directory {parent} does not exist; create it first, "
                            f"or {_HINT}")
        if not os.access(parent, os.W_OK):
            raise Unusable(f"{flag} {uri}: directory {parent} is not writable; {_HINT}")
        return
    if base in _DB_DRIVERS:
        module, package = _DB_DRIVERS[base]
        if driver:
            module = driver
            package = _DRIVER_MODULES.get(driver, driver)
        if importlib.util.find_spec(module) is None:
            parts = urlsplit(uri)
            shown = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
            raise Unusable(f"{flag} {shown}: MLflow needs the "
                            f"Python module {module!r} for {base}:// (pip install {package}); "
                            f"or give an MLflow server (http://HOST:5000) that holds the database")
        return
    if base == "file" or not scheme:
        raise Unusable(f"{flag} {uri}: MLflow's file store is not supported (MLflow 3 keeps it "
                        f"read-only); {_HINT}")
    raise Unusable(f"{flag} {uri}: unknown scheme {scheme!r}; {_HINT}")


def check_local_storage(uri: str | None, flag: str = "--storage") -> None:
    """A local storage directory must be (or become) a writable directory; s3:// is checked by
    the CLI against the bucket."""
    if not uri or uri.startswith("s3://"):
        return
    if "://" in uri and not uri.startswith("file://"):
        raise Unusable(f"{flag} {uri}: unknown scheme; give a directory or s3://BUCKET/PREFIX")
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().absolute()
    _writable_dir(path, f"{flag} {uri}", "give a writable directory or s3://BUCKET/PREFIX")


# --- data ----------------------------------------------------------------------------------

def _s3_answers(uri: str) -> str | None:
    """None when ``s3://bucket/key`` names an object or a non-empty prefix, else why not."""
    import boto3
    import botocore.exceptions

    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        return "no bucket named"
    try:
        client = boto3.client("s3")
        listed = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    except botocore.exceptions.ClientError as exc:
        return exc.response.get("Error", {}).get("Message") or str(exc)
    except botocore.exceptions.BotoCoreError as exc:
        return str(exc)
    if not listed.get("KeyCount"):
        return "no object there"
    return None


def check_requirements(spec, sweep_path: str | Path) -> None:
    """Every package of the sweep's ``requirements:`` is installed here (a local run, or the
    driver of a job, whose runtime environment installed them); the missing ones named."""
    from hpsweep.spec.requirements import missing

    absent = missing(list(spec._requirements))
    if absent:
        where = f"{sweep_path}:{spec._requirements_line}" if spec._requirements_line else str(sweep_path)
        raise Unusable(f"{where}: requirements: not installed here: {', '.join(absent)}; install them "
                       f"(pip install ...) or run on a cluster with `hpsweep submit`, which installs them "
                       f"on its nodes")


def check_data(spec, sweep_path: str | Path) -> None:
    """Every data location the sweep names (fixed config and swept values of the fields its
    trainer's Config marks as :class:`hpsweep.trainer.config.DataPath`) exists: local paths
    under the sweep's bases (the sweep file's directory, the data root), ``s3://`` objects or
    prefixes in their bucket. ``output:`` names are written by an earlier sweep and not checked
    here. Every problem at once."""
    from hpsweep.trainer.config import DataPath, path_fields
    from hpsweep.trainer.data import OUTPUT_SCHEME, check_location, expand_vars
    sweep_path = Path(sweep_path)
    fields = [f for f, kind in path_fields(spec.trainer_info().Config).items() if kind is DataPath]
    values: dict[tuple[str, str], str] = {}
    for field in fields:
        fixed = (spec.config or {}).get(field)
        if isinstance(fixed, str):
            values[(field, fixed)] = f"config.{field}"
        domain = (spec.parameters or {}).get(field)
        for value in _domain_values(domain):
            if isinstance(value, str):
                values[(field, value)] = f"parameters.{field}"
    bases = [Path(b) for b in spec.data_bases()]
    problems = []
    for (_field, raw), where in values.items():
        try:
            value = expand_vars(raw)
        except ValueError:
            continue  # the spec's own path check reports it with its line
        if value.startswith(OUTPUT_SCHEME):
            continue
        if value.startswith("s3://"):
            why = _s3_answers(value)
            if why:
                problems.append(f"{sweep_path}: {where}: {raw}: {why}; check the bucket and key "
                                "(and AWS_ENDPOINT_URL)")
            continue
        if "://" in value and not value.startswith("file://"):
            continue  # another scheme: the trainer decides
        why = check_location(value, bases, must_exist=True)
        if why:
            problems.append(f"{sweep_path}: {where}: {why}")
    if problems:
        raise Unusable("\n".join(problems))


def _domain_values(domain) -> list:
    """Every value a domain can give that names a file: a grid's values, a choice's options
    (its extremes); a numeric range names none."""
    if domain is None:
        return []
    return list(domain.extremes())


# --- where a cluster's runs go --------------------------------------------------------------

def local_tracking_path(uri: str) -> Path | None:
    """The file a tracking URI keeps its runs in on the machine that runs the driver, or None
    when it is a server or database every node reaches."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser().absolute()
    if uri.startswith("file:") or "://" not in uri and not uri.startswith("sqlite:"):
        return Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().absolute()
    return None


def local_storage_path(uri: str | None) -> Path | None:
    """The directory a storage URI names on one node, or None for s3://."""
    from hpsweep.store.storage import DEFAULT_STORAGE

    uri = uri or DEFAULT_STORAGE
    if uri.startswith("s3://"):
        return None
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().absolute()


def check_cluster_locations(tracking_uri: str | None, storage: str | None, *, where: str,
                            override: str = "--allow-local-store") -> None:
    """A sweep on a cluster: runs on a tracking server or database, checkpoints in s3://.

    ``tracking_uri``/``storage`` are what the job will use (None: the hpsweep default).
    ``where`` says why local paths are lost (the job's working directory, a node's disk).
    """
    problems = []
    from hpsweep.store.mlflow import DEFAULT_DIR

    tracking = local_tracking_path(tracking_uri) if tracking_uri else Path(DEFAULT_DIR).absolute() / "mlflow.db"
    if tracking is not None:
        problems.append(f"the runs would go to {tracking}; pass --tracking-uri http://MLFLOW-SERVER:5000 "
                        "(an MLflow server every node reaches)")
    local = local_storage_path(storage)
    if local is not None:
        problems.append(f"the checkpoints would go to {local}; pass --storage s3://BUCKET/PREFIX")
    if problems:
        raise Unusable(f"a sweep on a cluster must keep its runs and checkpoints where every node "
                        f"and you can reach them, but {where}: " + "; ".join(problems)
                        + f" (or {override} if that disk really is shared and kept)")


def check_cluster_store(address: str, tracking_uri: str, storage: str | None) -> None:
    """``run --address``: refuse runs or checkpoints on a disk that the cluster's other nodes,
    or the user after the job, cannot reach: the job's working directory (which Ray deletes)
    or one node's disk of a multi-node cluster."""
    if local_tracking_path(tracking_uri) is None and local_storage_path(storage) is None:
        return
    cwd = Path.cwd().resolve()
    if "runtime_resources" in cwd.parts or any(p.startswith("_ray_pkg_") for p in cwd.parts):
        where = f"this job runs in Ray's temporary copy of the working directory ({cwd}), deleted with it"
    elif address.startswith("ray://"):
        where = "a Ray Client address runs the driver on the cluster, not on this machine"
    else:
        from hpsweep.run.localray import cluster_nodes

        nodes = cluster_nodes(address)
        if len(nodes) <= 1:
            return  # one machine: its disk is every node's disk
        where = f"the cluster at {address} has {len(nodes)} nodes ({', '.join(sorted(nodes))}), each with its own disk"
    check_cluster_locations(tracking_uri, storage, where=where)
