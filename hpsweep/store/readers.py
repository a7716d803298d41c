"""Reading a sweep's runs without MLflow's client: importing it (and, for SQLite, opening its
store) takes 1.2 to 3 s, more than ``status`` or ``results`` need for everything else.

Two readers answer the calls :mod:`hpsweep.store.runs` makes (an experiment by name, runs by a
filter, metric histories in bulk) and return what MLflow's client returns, as far as those
reads look (ids, status, times, tags, params, latest metrics and their steps):

- :class:`RestReader`: an ``http(s)`` tracking server that takes no credentials, through its
  REST API with the standard library;
- :class:`SqliteReader`: a ``sqlite:///`` store (the default, ``.hpsweep/mlflow.db``), through
  the standard library's ``sqlite3``, read-only, in MLflow's own tables (``experiments``,
  ``runs``, ``tags``, ``params``, ``latest_metrics``, ``metrics``).

:func:`reader_for` gives one where it can read exactly what the client would, else None (a
server with credentials, TLS settings or an auth plugin; a store of another kind; a SQLite
file with tables other than MLflow 3's): then MLflow's client reads.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

__all__ = ["reader_for", "RestReader", "SqliteReader", "Page"]


class Page(list):
    """A page of runs, as ``MlflowClient.search_runs`` returns it (``.token``: the next page)."""

    token: str | None = None


def reader_for(uri: str | None):
    """A client-free reader for ``uri``, or None where MLflow's client must read."""
    return RestReader.for_uri(uri) or SqliteReader.for_uri(uri)


def _int(value) -> int | None:
    return int(value) if value is not None else None


def _run(run_id: str, status: str, start, end, tags: dict, params: dict, metrics: dict,
         steps: dict) -> SimpleNamespace:
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, status=status, start_time=_int(start), end_time=_int(end)),
        data=SimpleNamespace(tags=tags, params=params, metrics=metrics, steps=steps))


class RestReader:
    """An ``http(s)`` tracking server that takes no credentials, through its REST API. Where
    the client would add anything (a user, a token, TLS settings, an auth plugin, a credentials
    file), :meth:`for_uri` gives None and MLflow's client reads instead."""

    _SETTINGS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                 "MLFLOW_TRACKING_CLIENT_CERT_PATH")

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    @classmethod
    def for_uri(cls, uri: str | None) -> RestReader | None:
        if not uri or urllib.parse.urlsplit(uri).scheme not in ("http", "https") or "@" in uri:
            return None
        if any(os.environ.get(k) for k in cls._SETTINGS) or (Path.home() / ".mlflow" / "credentials").exists():
            return None
        return cls(uri)

    def _call(self, path: str, body: dict | None = None, query: dict | list | None = None,
              api: str = "api") -> dict | None:
        import urllib.error
        import urllib.request

        url = f"{self.url}/{api}/2.0/mlflow/{path}"
        if query:
            url += f"?{urllib.parse.urlencode(query, doseq=True)}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise RuntimeError(f"MLflow at {self.url}: {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from None

    def get_experiment_by_name(self, name: str):
        got = self._call("experiments/get-by-name", query={"experiment_name": name})
        if not got or "experiment" not in got:
            return None
        e = got["experiment"]
        return SimpleNamespace(experiment_id=e["experiment_id"], name=e.get("name", name),
                               lifecycle_stage=e.get("lifecycle_stage", "active"),
                               tags={t["key"]: t.get("value", "") for t in e.get("tags", [])})

    def search_experiments(self) -> list:
        """Every active experiment (id, name, tags)."""
        out, token = [], None
        while True:
            body = {"max_results": 1000, "view_type": "ACTIVE_ONLY", **({"page_token": token} if token else {})}
            got = self._call("experiments/search", body) or {}
            out += [SimpleNamespace(experiment_id=e["experiment_id"], name=e["name"], lifecycle_stage="active",
                                    tags={t["key"]: t.get("value", "") for t in e.get("tags", [])})
                    for e in got.get("experiments", [])]
            token = got.get("next_page_token")
            if not token:
                return out

    def search_runs(self, experiment_ids, filter_string: str = "", max_results: int = 1000,
                    page_token: str | None = None, **_) -> Page:
        body = {"experiment_ids": list(experiment_ids), "filter": filter_string, "max_results": max_results}
        if page_token:
            body["page_token"] = page_token
        got = self._call("runs/search", body) or {}
        page = Page()
        for r in got.get("runs", []):
            info, data = r["info"], r.get("data", {})
            metrics = data.get("metrics", [])
            page.append(_run(info["run_id"], info.get("status", ""), info.get("start_time"), info.get("end_time"),
                             {t["key"]: t.get("value", "") for t in data.get("tags", [])},
                             {t["key"]: t.get("value", "") for t in data.get("params", [])},
                             {m["key"]: float(m["value"]) for m in metrics},
                             {m["key"]: int(m.get("step", 0)) for m in metrics}))
        page.token = got.get("next_page_token") or None
        return page

    def metric_history_bulk(self, run_ids: Sequence[str], key: str, max_results: int):
        """[(run_id, step, value, timestamp)] of ``key`` for up to 100 runs: the UI's bulk route."""
        got = self._call("metrics/get-history-bulk", api="ajax-api", query=[
            *(("run_id", r) for r in run_ids), ("metric_key", key), ("max_results", max_results)]) or {}
        return [(m["run_id"], int(m.get("step", 0)), float(m["value"]), int(m.get("timestamp", 0)))
                for m in got.get("metrics", [])]


_CLAUSE = re.compile(r"\s*(?:tags\.`([^`]+)`|attributes\.(status))\s*(=|!=)\s*'((?:[^']|'')*)'\s*")


class SqliteReader:
    """A ``sqlite:///`` MLflow store read with ``sqlite3``, read-only. Filters: the clauses
    :mod:`hpsweep.store.runs` writes (``tags.`K` = 'V'``, ``attributes.status = | != 'S'``,
    joined with ``and``); runs of the active lifecycle only, as the client's default."""

    _TABLES = {"experiments", "experiment_tags", "runs", "tags", "params", "latest_metrics", "metrics"}

    def __init__(self, path: Path) -> None:
        import sqlite3

        self.path = path
        self.db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(experiments)")}
        self._workspace = "workspace" in cols

    @classmethod
    def for_uri(cls, uri: str | None) -> SqliteReader | _Empty | None:
        if not uri or not uri.startswith("sqlite:///") or "?" in uri:
            return None
        import sqlite3

        path = Path(uri[len("sqlite:///"):])
        if not path.exists():
            return _Empty()  # nothing tracked yet; MLflow's client would create the store
        try:
            reader = cls(path)
            names = {r[0] for r in reader.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.Error:
            return None
        if not cls._TABLES <= names:
            return None if names else _Empty()
        return reader

    def _experiment(self, where: str, args: tuple):
        sql = f"SELECT experiment_id, name, lifecycle_stage FROM experiments WHERE {where}"
        if self._workspace:
            sql += " AND workspace = 'default'"
        rows = self.db.execute(sql, args).fetchall()
        out = []
        for eid, name, stage in rows:
            tags = dict(self.db.execute("SELECT key, value FROM experiment_tags WHERE experiment_id = ?", (eid,)))
            out.append(SimpleNamespace(experiment_id=str(eid), name=name, lifecycle_stage=stage, tags=tags))
        return out

    def get_experiment_by_name(self, name: str):
        got = self._experiment("name = ?", (name,))
        return got[0] if got else None

    def search_experiments(self) -> list:
        return self._experiment("lifecycle_stage = 'active'", ())

    def search_runs(self, experiment_ids, filter_string: str = "", max_results: int = 1000,
                    page_token: str | None = None, **_) -> Page:
        where = ["r.lifecycle_stage = 'active'",
                 f"r.experiment_id IN ({','.join('?' * len(experiment_ids))})"]
        args: list = [int(e) for e in experiment_ids]
        for clause in filter(None, re.split(r"\s+and\s+", filter_string.strip(), flags=re.IGNORECASE)):
            m = _CLAUSE.fullmatch(clause)
            if not m:
                raise ValueError(f"SqliteReader: unsupported filter clause {clause!r}")
            tag, _status, op, value = m.groups()
            value = value.replace("''", "'")
            if tag:
                exists = "EXISTS" if op == "=" else "NOT EXISTS"
                where.append(f"{exists} (SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid "
                             "AND t.key = ? AND t.value = ?)")
                args += [tag, value]
            else:
                where.append(f"r.status {op} ?")
                args.append(value)
        offset = int(page_token or 0)
        rows = self.db.execute(
            "SELECT r.run_uuid, r.status, r.start_time, r.end_time FROM runs r WHERE "
            + " AND ".join(where) + " ORDER BY r.start_time DESC, r.run_uuid LIMIT ? OFFSET ?",
            [*args, max_results + 1, offset]).fetchall()
        more = len(rows) > max_results
        rows = rows[:max_results]
        ids = [r[0] for r in rows]
        tags: dict[str, dict] = {i: {} for i in ids}
        params: dict[str, dict] = {i: {} for i in ids}
        metrics: dict[str, dict] = {i: {} for i in ids}
        steps: dict[str, dict] = {i: {} for i in ids}
        for chunk in (ids[i:i + 500] for i in range(0, len(ids), 500)):
            among = f"WHERE run_uuid IN ({','.join('?' * len(chunk))})"
            for rid, k, v in self.db.execute(f"SELECT run_uuid, key, value FROM tags {among}", chunk):
                tags[rid][k] = v
            for rid, k, v in self.db.execute(f"SELECT run_uuid, key, value FROM params {among}", chunk):
                params[rid][k] = v
            for rid, k, v, step, nan in self.db.execute(
                    f"SELECT run_uuid, key, value, step, is_nan FROM latest_metrics {among}", chunk):
                metrics[rid][k] = math.nan if nan else float(v)
                steps[rid][k] = int(step)
        page = Page(_run(rid, status, start, end, tags[rid], params[rid], metrics[rid], steps[rid])
                    for rid, status, start, end in rows)
        page.token = str(offset + max_results) if more else None
        return page

    def artifact_uri(self, run_id: str) -> str | None:
        """Where run ``run_id`` keeps its artifacts (``file://...`` for a local directory)."""
        row = self.db.execute("SELECT artifact_uri FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
        return row[0] if row else None

    def metric_history_bulk(self, run_ids: Sequence[str], key: str, max_results: int):
        marks = ",".join("?" * len(run_ids))
        rows = self.db.execute(
            f"SELECT run_uuid, step, value, timestamp, is_nan FROM metrics WHERE key = ? "
            f"AND run_uuid IN ({marks}) ORDER BY run_uuid, timestamp, step LIMIT ?", [key, *run_ids, max_results])
        return [(rid, int(step), math.nan if nan else float(v), int(ts)) for rid, step, v, ts, nan in rows]


class _Empty:
    """A store with nothing in it yet (its file not created)."""

    def get_experiment_by_name(self, name: str):
        return None

    def search_experiments(self) -> list:
        return []

    def search_runs(self, *_, **__) -> Page:
        return Page()

    def metric_history_bulk(self, *_):
        return []
