"""hpsweep.cluster without a cluster: how a job is built, and the client's conversation with a
stand-in for the Ray Jobs API (token auth, submit, status, unknown jobs). The real cluster is
in tests/integration/test_cluster.py."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hpsweep.cli import main
from hpsweep.cluster import jobs as cluster
from hpsweep.errors import UserError

SWEEP = """\
name: client-test
trainer: sleep
config: {reports: 2, sleep: 0.0}
parameters:
  x: {grid: [0.0, 1.0]}
metric: {name: loss, mode: min}
"""
TOKEN = "0123456789abcdef" * 4


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "s.yaml").write_text(SWEEP)
    monkeypatch.chdir(tmp_path)
    for name in ("RAY_ADDRESS", "HPSWEEP_RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def _cli(*argv: str) -> int:
    # the CLI's one user-error printer (cluster.py raises, prints nothing)
    return main(list(argv))


def test_submission_ships_the_working_dir_and_runs_the_same_command(project):
    sub = cluster.build_submission(
        Path("sweeps/s.yaml"), tracking_uri="http://mlflow:5000", storage="s3://b/ckpt",
        s3_endpoint="http://minio:9000",
    )
    assert sub["entrypoint"] == ("hpsweep run sweeps/s.yaml --address auto --tracking-uri "
                                 "http://mlflow:5000 --storage s3://b/ckpt --s3-endpoint http://minio:9000")
    env = sub["runtime_env"]
    shipped = Path(env["working_dir"])  # a staged copy: the allow-list, not the project
    assert shipped != project.resolve() and (shipped / "sweeps" / "s.yaml").read_text() == SWEEP
    assert ".venv" in env["excludes"] and ".git" in env["excludes"]
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["env_vars"]["HPSWEEP_STORAGE"] == "s3://b/ckpt"
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert not any("SECRET" in k or "PASSWORD" in k for k in env["env_vars"])
    assert sub["submission_id"].startswith("hpsweep-client-test-")
    assert sub["metadata"] == {"hpsweep.sweep": "client-test", "hpsweep.file": "s.yaml"}
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray accepts it


def test_the_submitting_shells_settings_do_not_leak_into_the_job(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "laptop-secret")
    sub = cluster.build_submission(Path("sweeps/s.yaml"))
    assert "--tracking-uri" not in sub["entrypoint"]
    assert "MLFLOW_TRACKING_URI" not in sub["runtime_env"]["env_vars"]
    assert "laptop-secret" not in json.dumps(sub)


def test_user_errors_come_before_anything_is_sent(project):
    outside = project.parent / "elsewhere.yaml"
    outside.write_text(SWEEP)
    with pytest.raises(UserError, match="inside the working directory"):
        cluster.build_submission(outside)
    with pytest.raises(UserError, match="carries a password") as exc:
        cluster.build_submission(Path("sweeps/s.yaml"), tracking_uri="https://me:hunter2@mlflow.example")
    assert "hunter2" not in str(exc.value)
    (project / "sweeps" / "bad.yaml").write_text(SWEEP.replace("trainer: sleep", "trainer: slep"))
    with pytest.raises(UserError, match="slep"):
        cluster.build_submission(Path("sweeps/bad.yaml"))
    with pytest.raises(UserError, match="drop --pip"):
        cluster.build_submission(Path("sweeps/s.yaml"), image="x:1", pip=["numpy"])


def test_image_mode_carries_the_sweep_text_and_its_script_writes_it(project, tmp_path):
    sub = cluster.build_submission(Path("sweeps/s.yaml"), image="ghcr.io/hpsweep/hpsweep:0.1.0",
                                   storage="s3://b/p q")
    env = sub["runtime_env"]
    assert set(env) == {"image_uri", "env_vars"}  # all Ray allows beside image_uri
    assert env["env_vars"]["HPSWEEP_SWEEP_YAML"] == SWEEP
    # run the entrypoint with a stand-in `hpsweep` that shows what it was given
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "hpsweep"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "arg:$a"; done\ncat "$2"\n')
    fake.chmod(0o755)
    out = subprocess.run(["sh", "-c", sub["entrypoint"]], capture_output=True, text=True,
                         env={**env["env_vars"], "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:3] == ["arg:run", "arg:/tmp/hpsweep-s.yaml", "arg:--address"]
    assert "arg:s3://b/p q" in lines  # quoting survives
    assert out.stdout.endswith(SWEEP)


def test_address_and_token_come_from_flags_env_and_files(project, monkeypatch):
    with pytest.raises(UserError, match="no cluster address"):
        cluster.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://ray:8265")
    assert cluster.resolve_address(None) == "http://ray:8265"
    monkeypatch.setenv("HPSWEEP_RAY_ADDRESS", "http://hp:8265/")
    assert cluster.resolve_address(None) == "http://hp:8265"
    assert cluster.resolve_address("http://flag:8265") == "http://flag:8265"

    assert cluster.auth_headers() == {}
    token_file = project / "home" / ".ray" / "auth_token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text(TOKEN + "\n")
    assert cluster.auth_headers() == {"Authorization": f"Bearer {TOKEN}"}
    other = project / "token"
    other.write_text("other")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    assert cluster.auth_headers() == {"Authorization": "Bearer other"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert cluster.auth_headers() == {"Authorization": "Bearer fromenv"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert cluster.auth_headers() == {}


class _FakeJobsApi(BaseHTTPRequestHandler):
    """Just enough of the Ray Jobs REST API, with token authentication."""

    jobs: dict[str, dict] = {}
    auth_seen: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code: int, body) -> None:
        data = (json.dumps(body) if not isinstance(body, str) else body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        self.auth_seen.append(self.headers.get("Authorization", ""))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._send(401, "Unauthorized: Missing authentication token")
            return False
        return True

    def do_GET(self):
        if not self._authorized():
            return
        if self.path == "/api/version":
            return self._send(200, {"version": "4", "ray_version": "2.60.0", "ray_commit": "x"})
        if self.path == "/api/jobs/":
            return self._send(200, list(self.jobs.values()))
        job = self.jobs.get(self.path.rsplit("/", 1)[-1])
        if job is None:
            return self._send(404, f"Job {self.path} does not exist")
        return self._send(200, job)

    def do_POST(self):
        if not self._authorized():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        sid = body["submission_id"]
        self.jobs[sid] = {
            "type": "SUBMISSION", "job_id": None, "submission_id": sid, "status": "PENDING",
            "entrypoint": body["entrypoint"], "metadata": body.get("metadata"),
            "runtime_env": body.get("runtime_env"), "start_time": 1795300000000,
        }
        return self._send(200, {"job_id": sid, "submission_id": sid})


@pytest.fixture
def jobs_api():
    _FakeJobsApi.jobs, _FakeJobsApi.auth_seen = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJobsApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_submit_status_and_unknown_jobs_against_the_jobs_api(project, jobs_api, monkeypatch, capsys):
    # no token: a one-line error naming where the token goes, exit 2
    assert _cli("submit", "sweeps/s.yaml", "--address", jobs_api, "--image", "img:1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "auth_token" in err and "Traceback" not in err

    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    assert _cli("submit", "sweeps/s.yaml", "--address", jobs_api, "--image", "img:1",
                "--tracking-uri", "http://mlflow:5000") == 0
    job_id = capsys.readouterr().out.strip()
    (job,) = _FakeJobsApi.jobs.values()
    assert job["submission_id"] == job_id
    assert job["runtime_env"]["image_uri"] == "img:1"
    assert job["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert set(_FakeJobsApi.auth_seen[-2:]) == {f"Bearer {TOKEN}"}

    assert cluster.job_status(jobs_api, None) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["JOB", "STATUS", "SWEEP", "STARTED", "ENDED"]
    assert table[1].split()[:3] == [job_id, "PENDING", "client-test"]
    assert cluster.job_status(jobs_api, job_id) == 0
    assert "status:     PENDING" in capsys.readouterr().out

    assert _cli("status", "nope", "--address", jobs_api) == 2
    assert "no job 'nope'" in capsys.readouterr().err
    assert _cli("logs", "nope", "--address", jobs_api) == 2


def test_unreachable_cluster_is_one_clear_line(project, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert _cli("status", "--address", address) == 2
    assert _cli("stop", "job1", "--address", address) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("cannot reach the Ray Jobs API" in line for line in err)


def test_the_job_ships_an_allow_list_without_credentials(project, capsys):
    """The packages, the sweep file and what it names; never a credentials file."""
    import shutil

    root = Path(__file__).resolve().parents[2]
    for package in ("hpsweep", "trainers"):
        shutil.copytree(root / package, project / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    planted = {".env": "AWS_SECRET_ACCESS_KEY=x", "secrets.env": "T=1", ".netrc": "machine m",
               "id_rsa": "-----BEGIN", ".aws/credentials": "[default]", "notes/todo.txt": "x",
               "hpsweep/.env": "LEAK=1", "trainers/id_ed25519": "k", "sweeps/other.yaml": SWEEP}
    for name, text in planted.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    (project / "sweeps" / "named.txt").write_text("data")
    snap = (root / "sweeps" / "snap.charlm-cpu.yaml").read_text()
    original = "enwiki/enwiki-sample.xml.bz2"
    assert original in snap
    # a relative data path resolves next to the sweep file
    (project / "sweeps" / "s.yaml").write_text(snap.replace(original, "named.txt"))
    sub = cluster.build_submission(Path("sweeps/s.yaml"), tracking_uri="http://mlflow:5000",
                                   storage="s3://b/p")
    shipped = Path(sub["runtime_env"]["working_dir"])
    files = sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file())
    assert "sweeps/s.yaml" in files and "sweeps/named.txt" in files
    assert "hpsweep/cli.py" in files and "trainers/sleep/__init__.py" in files
    for name in planted:
        assert name not in files, f"{name} was shipped"
    assert not [f for f in files if not f.startswith(("hpsweep/", "trainers/", "sweeps/"))], files
    err = capsys.readouterr().err
    assert "left out of the job (credentials never travel with it): hpsweep/.env, trainers/id_ed25519" in err
    shutil.rmtree(shipped)

    (project / "sweeps" / "s.yaml").write_text(snap.replace(original, ".aws/credentials"))
    with pytest.raises(UserError, match=r"\.aws/credentials: looks like a credentials file"):
        cluster.build_submission(Path("sweeps/s.yaml"))


@pytest.mark.parametrize("uri", ["http://mlflow:5000/?token=abc123", "https://m.example/x?X-Amz-Signature=abc123",
                                 "http://mlflow:5000/?access_token=abc123&x=1"])
def test_tokens_in_query_strings_are_refused(project, uri):
    with pytest.raises(UserError, match="carries a credential in its query string") as exc:
        cluster.build_submission(Path("sweeps/s.yaml"), tracking_uri=uri)
    assert "abc123" not in str(exc.value)
    with pytest.raises(UserError, match="carries a credential in its query string"):
        cluster.build_submission(Path("sweeps/s.yaml"), tracking_uri="http://mlflow:5000", storage="s3://b/p?" + uri.split("?")[1])
