"""When a worker writes through the lean REST client (:mod:`hpsweep.store.rest`) and when through
MLflow's own: whatever MLflow's client would add to a request sends the worker to MLflow's."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpsweep.store import rest


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in (*rest._SETTINGS, "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                 "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_a_plain_tracking_server_gets_the_lean_client(clean_env):
    assert rest.plain_http("http://127.0.0.1:5000")
    assert rest.plain_http("https://mlflow.example.org/prefix")
    assert isinstance(rest.worker_client("http://127.0.0.1:5000"), rest.RestClient)


@pytest.mark.parametrize("uri", [None, "", "sqlite:///x.db", "file:///tmp/mlruns", "databricks",
                                 "http://user:secret@mlflow:5000", "postgresql://h/db"])
def test_what_is_not_a_plain_http_server_goes_to_mlflow(clean_env, uri):
    assert not rest.plain_http(uri)


@pytest.mark.parametrize("name", rest._SETTINGS)
def test_any_credential_auth_or_tls_setting_goes_to_mlflow(clean_env, monkeypatch, name):
    monkeypatch.setenv(name, "x")
    assert not rest.plain_http("http://127.0.0.1:5000")
    client = rest.worker_client("http://127.0.0.1:5000")
    assert not isinstance(client, rest.RestClient)
    assert type(client._client).__name__ == "MlflowClient"


def test_a_credentials_file_goes_to_mlflow(clean_env):
    (clean_env / ".mlflow").mkdir()
    (clean_env / ".mlflow" / "credentials").write_text("[mlflow]\nmlflow_tracking_token = t\n")
    assert not rest.plain_http("http://127.0.0.1:5000")


def test_a_proxy_for_the_host_goes_to_mlflow_unless_bypassed(clean_env, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://proxy.example.org:3128")
    assert not rest.plain_http("http://mlflow.internal:5000")
    monkeypatch.setenv("no_proxy", "mlflow.internal")
    assert rest.plain_http("http://mlflow.internal:5000")


def test_mlflows_client_takes_the_lean_entities(clean_env, tmp_path):
    """Under MLflow's client the tracker's Metric/Param/RunTag become MLflow's own (a SQLite store)."""
    client = rest.worker_client(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("e")
    run = client.create_run(exp).info.run_id
    client.log_batch(run, metrics=[rest.Metric("loss", 0.5, 1000, 3)], params=[rest.Param("lr", "0.1")],
                     tags=[rest.RunTag("t", "v")])
    got = client.get_run(run)
    assert got.data.metrics == {"loss": 0.5} and got.data.params == {"lr": "0.1"} and got.data.tags["t"] == "v"
    assert [(m.step, m.value) for m in client.get_metric_history(run, "loss")] == [(3, 0.5)]


def test_a_ca_bundle_is_used_not_refused(clean_env, monkeypatch, tmp_path):
    """``REQUESTS_CA_BUNDLE`` (often set machine-wide) is what MLflow's client trusts over https:
    the lean client trusts the same file."""
    import ssl

    import certifi

    bundle = tmp_path / "ca.pem"
    bundle.write_text(Path(certifi.where()).read_text())
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    assert rest.plain_http("https://mlflow.example.org")
    context = rest._tls_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and len(context.get_ca_certs()) > 10
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(OSError):
        rest._tls_context()


def test_an_overloaded_servers_400_is_retried_a_bad_request_is_not(monkeypatch):
    """A SQL-backed server whose connection pool ran dry answers 400 for a request that did
    nothing: retried, as a 503; any other 400 is the caller's mistake and raised at once. The
    server here is the standard library's, answering as an overloaded MLflow does."""
    import http.server
    import json
    import threading

    answers = [(400, {"error_code": "BAD_REQUEST", "message": "(sqlalchemy.exc.TimeoutError) QueuePool "
                      "limit of size 5 overflow 10 reached, connection timed out, timeout 30.00"}),
               (200, {"run": {"info": {"run_id": "r1", "status": "RUNNING"}, "data": {}}}),
               (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "bad run id"})]
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            status, body = answers.pop(0)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
        client = rest.RestClient(f"http://127.0.0.1:{server.server_address[1]}")
        assert client.get_run("r1").info.run_id == "r1"          # the pool's 400, then the answer
        assert len(seen) == 2
        with pytest.raises(rest.MlflowRestError, match="HTTP 400.*bad run id"):
            client.get_run("nope")
        assert len(seen) == 3                                     # not retried
    finally:
        server.shutdown()
