"""A lean MLflow client for the workers: the calls a cell's tracker makes (runs created, searched,
read, updated, metrics/params/tags in batches), through MLflow's REST API with the standard
library, for an ``http(s)`` tracking server that takes no credentials.

Why: importing MLflow's client costs a worker 1.5 to 2.2 s and about 100 MB of memory (measured
with ``python -X importtime`` and the peak RSS of a worker running the sleep trainer; see
``bench/slots.py``), for a dozen kinds of JSON request. :func:`worker_client` returns this client
where it does exactly what MLflow's would, and MLflow's own client everywhere else:

- :func:`plain_http` is the rule (also that of ``status``'s reader, :mod:`hpsweep.store.runs`):
  an ``http``/``https`` URI with no user in it, and none of what MLflow's client would add to a
  request: credentials (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``, ``~/.mlflow/
  credentials``), an auth provider (``MLFLOW_TRACKING_AUTH``, or an installed plugin of the entry
  point groups ``mlflow.request_auth_provider``/``mlflow.request_header_provider``), TLS settings
  (``MLFLOW_TRACKING_INSECURE_TLS``, the server/client certificate paths), or an HTTP proxy for
  the server's host. Over ``https`` the server's certificate is checked against the CA bundle
  that MLflow's client (``requests``) trusts: ``REQUESTS_CA_BUNDLE``, else ``CURL_CA_BUNDLE``,
  else ``certifi``'s;
- requests are retried as MLflow's are (HTTP 429, 500, 502, 503, 504 and connection errors;
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``,
  ``MLFLOW_HTTP_REQUEST_BACKOFF_JITTER``, ``MLFLOW_HTTP_REQUEST_TIMEOUT`` read with MLflow's
  defaults), over one kept-alive connection per thread;
- artifacts (``log_text``, ``log_artifact``, ``log_artifacts``: an error's traceback, a
  trainer's outputs) go through MLflow's client, made on first use: where they land depends on
  the experiment's artifact store, which only MLflow knows how to write.

:class:`RestClient` has ``MlflowClient``'s method names and arguments for what it does, and
returns objects with the attributes the tracker reads (``run.info.run_id``, ``.status``,
``run.data.tags``, ``.params``, ``.metrics``, ``run.data.to_proto().metrics``): code written
against MLflow's client works with either. It takes metrics, params and tags as any objects with
``key``/``value`` (and ``timestamp``/``step``) attributes, MLflow's entities or :class:`Metric`,
:class:`Param`, :class:`RunTag` here; under MLflow's client (:class:`_Entities`) the latter are
turned into MLflow's.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

__all__ = ["Metric", "Param", "RunTag", "RestClient", "plain_http", "worker_client"]


class Metric(NamedTuple):
    key: str
    value: float
    timestamp: int
    step: int


class Param(NamedTuple):
    key: str
    value: str


class RunTag(NamedTuple):
    key: str
    value: str


#: what MLflow's client would add to a request (credentials, an auth scheme, TLS settings)
_SETTINGS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
             "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
             "MLFLOW_TRACKING_CLIENT_CERT_PATH")
#: plugins that change MLflow's requests (auth, headers)
_PLUGIN_GROUPS = ("mlflow.request_auth_provider", "mlflow.request_header_provider")
_plugins: bool | None = None


def _has_plugins() -> bool:
    global _plugins
    if _plugins is None:
        from importlib.metadata import entry_points

        _plugins = any(entry_points(group=g) for g in _PLUGIN_GROUPS)
    return _plugins


def plain_http(uri: str | None) -> bool:
    """Whether ``uri`` is a tracking server that the standard library reaches exactly as MLflow's
    client would (see the module docstring): no credentials, auth, TLS settings or proxy."""
    if not uri:
        return False
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" in parts.netloc or not parts.hostname:
        return False
    if any(os.environ.get(k) for k in _SETTINGS) or (Path.home() / ".mlflow" / "credentials").exists():
        return False
    proxies = urllib.request.getproxies()
    if proxies.get(parts.scheme) and not urllib.request.proxy_bypass(parts.hostname):
        return False
    return not _has_plugins()


def worker_client(tracking_uri: str | None):
    """The client a worker writes a cell's run with: :class:`RestClient` where
    :func:`plain_http` says it may, else MLflow's own (:func:`hpsweep.store.mlflow.mlflow_client`)
    taking this module's entities too."""
    if plain_http(tracking_uri):
        return RestClient(tracking_uri)
    from hpsweep.store.mlflow import mlflow_client

    return _Entities(mlflow_client(tracking_uri))


def _tls_context():
    """The certificates MLflow's client (``requests``) would trust: ``REQUESTS_CA_BUNDLE``, else
    ``CURL_CA_BUNDLE`` (a file or a directory), else ``certifi``'s bundle."""
    import ssl

    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if not bundle:
        try:
            import certifi

            bundle = certifi.where()
        except ImportError:
            return ssl.create_default_context()
    if os.path.isdir(bundle):
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle)


class MlflowRestError(RuntimeError):
    """A request the server refused (not retried: a 4xx other than 429)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


_RETRY_CODES = (429, 500, 502, 503, 504)   # MLflow's client retries these
#: an overloaded SQL-backed server answers 400 for what is transient: its connection pool ran
#: dry (SQLAlchemy's "QueuePool limit ... connection timed out") or SQLite stayed locked; the
#: request did nothing, and is retried as a 503 would be (bench/slots.py at 64 trials: 63 of
#: the first 107 cells failed on these against a SQLite server with one worker)
_TRANSIENT_400 = ("QueuePool limit", "database is locked")


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


class RestClient:
    """The subset of ``MlflowClient`` a cell's tracker uses, over MLflow's REST API (see the
    module docstring)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri.rstrip("/")
        parts = urllib.parse.urlsplit(self.tracking_uri)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._base = parts.path.rstrip("/")
        self._local = threading.local()
        self._retries = int(_env_number("MLFLOW_HTTP_REQUEST_MAX_RETRIES", 7))
        self._backoff = _env_number("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", 2)
        self._jitter = _env_number("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", 1.0)
        self._timeout = _env_number("MLFLOW_HTTP_REQUEST_TIMEOUT", 120)
        self._artifacts = None
        self._artifacts_lock = threading.Lock()
        self.requests = 0   # requests sent (retries included): what a worker costs the server

    # -- transport
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._https:
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                                   context=_tls_context())
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _call(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
        url = f"{self._base}/api/2.0/mlflow/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            try:
                conn = self._connection()
                self.requests += 1
                conn.request(method, url, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()   # a half-used connection is not reused
                if last:
                    raise ConnectionError(f"MLflow at {self.tracking_uri}: {path}: {exc}") from exc
            else:
                if status < 300:
                    return json.loads(payload or b"{}")
                transient = status in _RETRY_CODES or (
                    status == 400 and any(t.encode() in payload for t in _TRANSIENT_400))
                if not transient or last:
                    raise MlflowRestError(f"MLflow at {self.tracking_uri}: {path}: HTTP {status}: "
                                          f"{payload[:500].decode(errors='replace')}", status)
            if attempt:  # as urllib3's Retry: the first retry at once, then exponential backoff
                time.sleep(min(120.0, self._backoff * 2 ** (attempt - 1)) + random.random() * self._jitter)
        raise AssertionError("unreachable: the loop returns or raises")

    # -- runs
    def create_run(self, experiment_id: str, start_time: int | None = None,
                   tags: dict[str, str] | None = None, run_name: str | None = None):
        tags = tags or {}
        body = {"experiment_id": str(experiment_id), "user_id": tags.get("mlflow.user", "unknown"),
                "start_time": start_time or int(time.time() * 1000),
                "tags": [{"key": k, "value": str(v)} for k, v in tags.items()]}
        if run_name is not None:
            body["run_name"] = run_name
        return _run(self._call("POST", "runs/create", body)["run"])

    def get_run(self, run_id: str):
        return _run(self._call("GET", "runs/get", query={"run_id": run_id})["run"])

    def search_runs(self, experiment_ids, filter_string: str = "", run_view_type: int = 1,
                    max_results: int = 1000, order_by: list[str] | None = None,
                    page_token: str | None = None):
        view = {1: "ACTIVE_ONLY", 2: "DELETED_ONLY", 3: "ALL"}.get(run_view_type, run_view_type)
        body: dict[str, Any] = {"experiment_ids": [str(e) for e in experiment_ids], "filter": filter_string,
                                "max_results": max_results, "run_view_type": view}
        if order_by:
            body["order_by"] = list(order_by)
        if page_token:
            body["page_token"] = page_token
        got = self._call("POST", "runs/search", body)
        page = _Page(_run(r) for r in got.get("runs", []))
        page.token = got.get("next_page_token") or None
        return page

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        body: dict[str, Any] = {"run_id": run_id, "run_uuid": run_id}
        if status is not None:
            body["status"] = status
        if name is not None:
            body["run_name"] = name
        self._call("POST", "runs/update", body)

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        self._call("POST", "runs/update", {"run_id": run_id, "run_uuid": run_id,
                                           "status": status or "FINISHED",
                                           "end_time": end_time or int(time.time() * 1000)})

    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), synchronous=None) -> None:
        body = {"run_id": run_id,
                "metrics": [{"key": m.key, "value": _number(m.value), "timestamp": int(m.timestamp),
                             "step": int(m.step or 0)} for m in metrics],
                "params": [{"key": p.key, "value": str(p.value)} for p in params],
                "tags": [{"key": t.key, "value": str(t.value)} for t in tags]}
        self._call("POST", "runs/log-batch", body)

    def delete_run(self, run_id: str) -> None:
        self._call("POST", "runs/delete", {"run_id": run_id})

    def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        """Every point of metric ``key`` of run ``run_id`` (all pages)."""
        points: list[Metric] = []
        token = None
        while True:
            query = {"run_id": run_id, "run_uuid": run_id, "metric_key": key, "max_results": 25000}
            if token:
                query["page_token"] = token
            got = self._call("GET", "metrics/get-history", query=query)
            points += [Metric(m["key"], _value(m.get("value", 0)), int(m.get("timestamp", 0)), int(m.get("step", 0)))
                       for m in got.get("metrics", [])]
            token = got.get("next_page_token")
            if not token:
                return points

    def set_tag(self, run_id: str, key: str, value: Any, synchronous=None) -> None:
        self._call("POST", "runs/set-tag", {"run_id": run_id, "run_uuid": run_id, "key": key,
                                            "value": str(value)})

    def log_metric(self, run_id: str, key: str, value: float, timestamp: int | None = None,
                   step: int | None = None, synchronous=None) -> None:
        self.log_batch(run_id, metrics=[Metric(key, value, timestamp or int(time.time() * 1000), step or 0)])

    # -- artifacts: MLflow's client (see the module docstring)
    def _artifact_client(self):
        with self._artifacts_lock:
            if self._artifacts is None:
                from hpsweep.store.mlflow import mlflow_client

                self._artifacts = mlflow_client(self.tracking_uri)
            return self._artifacts

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._artifact_client().log_text(run_id, text, artifact_file)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self._artifact_client().log_artifact(run_id, local_path, artifact_path)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        self._artifact_client().log_artifacts(run_id, local_dir, artifact_path)


def _number(value: float):
    """A metric value as MLflow's JSON carries it (NaN and infinities as strings)."""
    value = float(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _value(v) -> float:
    return float(v) if not isinstance(v, str) else float(v.replace("Infinity", "inf"))


class _Page(list):
    token: str | None = None


def _int(value) -> int | None:
    return int(value) if value is not None else None


def _run(r: dict):
    """A run from the REST API's JSON, with the attributes of MLflow's ``Run`` the tracker reads."""
    info, data = r.get("info", {}), r.get("data", {})
    metrics = [Metric(m["key"], _value(m.get("value", 0)), int(m.get("timestamp", 0)), int(m.get("step", 0)))
               for m in data.get("metrics", [])]
    proto = SimpleNamespace(metrics=metrics)
    return SimpleNamespace(
        info=SimpleNamespace(run_id=info.get("run_id") or info.get("run_uuid"), status=info.get("status", ""),
                             experiment_id=info.get("experiment_id"), run_name=info.get("run_name"),
                             start_time=_int(info.get("start_time")), end_time=_int(info.get("end_time")),
                             lifecycle_stage=info.get("lifecycle_stage", "active")),
        data=SimpleNamespace(tags={t["key"]: t.get("value", "") for t in data.get("tags", [])},
                             params={p["key"]: p.get("value", "") for p in data.get("params", [])},
                             metrics={m.key: m.value for m in metrics},
                             to_proto=lambda: proto))


class _Entities:
    """MLflow's client taking this module's :class:`Metric`, :class:`Param` and :class:`RunTag`
    as well as its own entities; everything else is the client's own."""

    def __init__(self, client) -> None:
        self._client = client

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), **kwargs) -> None:
        from mlflow.entities import Metric as M
        from mlflow.entities import Param as P
        from mlflow.entities import RunTag as T

        self._client.log_batch(
            run_id,
            metrics=[m if isinstance(m, M) else M(m.key, m.value, m.timestamp, m.step) for m in metrics],
            params=[p if isinstance(p, P) else P(p.key, p.value) for p in params],
            tags=[t if isinstance(t, T) else T(t.key, t.value) for t in tags], **kwargs)
