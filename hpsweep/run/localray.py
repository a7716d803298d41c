"""Starting Ray for ``hpsweep run``: in-process on this machine, or joining a cluster
(``--address``). The one module that calls ``ray.init``; it never imports ``ray.tune``.

In-process Ray takes about 4 s to start (its GCS, raylet and agents) on 2 cores. A driver
that begins it only after reading the sweep's state waits for both in turn, so :func:`begin`
starts it in a thread of its own as soon as the sweep file is validated, while the driver
imports Ray Tune and reads MLflow and the storage; the engine waits for it (:meth:`Start.wait`)
only when it hands Tune the trials. Ray ties the processes it starts to the thread that
started them (``PR_SET_PDEATHSIG``: they die when it ends), so that thread lives as long as the
driver. A rerun with nothing left to do should not start Ray at all: :func:`begin` starts it
early only when some cell of the plan has never been held (no lease record in the storage),
which a sweep that is done does not have; otherwise the engine starts it when it knows there
is work, as before.
"""

from __future__ import annotations

import os

# Set before ray (and ray.tune) is imported: no per-result JSON/CSV/TensorBoard files (MLflow
# has the metrics), and trials run in the caller's working directory so relative data paths work.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1e9")
# Trainers report different metrics at different times (training loss every few steps,
# validation now and then); Tune's check that every result carries the sweep metric would
# fail them. TrialRun carries the latest value of the sweep metric forward instead.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
# A failed trial's error is shown once per distinct error, in the trainer's own terms
# (engine._Outcomes.report_failures), not as Tune's log of every attempt's full Ray traceback.
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
# In-process Ray on loopback only. ray.init turns `_node_ip_address="127.0.0.1"` into the
# machine's external address (ray._private.services.resolve_ip_for_localhost) unless Ray runs
# without multi-node support, which this variable (read when ray is imported) switches off;
# then the GCS, raylet, object manager, workers, driver and agents all bind 127.0.0.1 (see
# README, "What listens where"). A driver joining a cluster (`--address`) takes the node's
# address from the cluster instead, so this changes nothing there.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import contextlib  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import ray  # noqa: E402

from hpsweep.run import reaper  # noqa: E402

__all__ = ["Start", "begin", "init", "ray_env", "cluster_nodes", "leave", "own_signals"]


class _RaysWords(logging.Filter):
    """Ray's messages that hpsweep says in its own words, or that are not the user's business:
    its notice that ray.init ran outside the main thread (:class:`Start` does that on purpose;
    :func:`own_signals` handles SIGTERM), Tune's "Resume experiment with: Tuner.restore(...)"
    and "Stop signal received" (a rerun resumes; ``hpsweep run`` says so), its list of trials
    that did not complete (the summary counts them), and its "No trial is running ..."
    (:mod:`hpsweep.run.resources` says what a sweep waits for). They stay in Ray's log files."""

    _DROPPED = ("SIGTERM handler is not set", "Experiment has been interrupted", "Stop signal received",
                "Trials did not complete", "Ignore this message if the cluster is autoscaling")

    def filter(self, record: logging.LogRecord) -> bool:
        with contextlib.suppress(Exception):
            return not str(record.msg).startswith(self._DROPPED)
        return True


for _name in ("ray._private.worker", "ray.tune.tune", "ray.tune.execution.insufficient_resources_manager",
              "ray.tune.execution.tune_controller"):
    logging.getLogger(_name).addFilter(_RaysWords())


def _on_sigterm(signum, frame) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signal.SIGINT, frame)  # Ray Tune's: end the run as after Ctrl-C
    else:
        raise KeyboardInterrupt


def own_signals() -> None:
    """SIGTERM (``timeout``, ``hpsweep stop``, a Ray job stopped) ends the driver as Ctrl-C does:
    its trials stopped, its runs KILLED, hpsweep's own words, instead of the stack dump of the
    failure-signal handler Ray's core worker installs in the driver (``*** SIGTERM received ...
    PC: @``). Called from the main thread after Ray's start (which installs that handler)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)

_in_process = False  # this process started Ray in itself

#: the driver's variables every trial gets (credentials never: workers read their own)
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                  "MLFLOW_DISABLE_TELEMETRY", "HPSWEEP_DATA_CACHE", "HPSWEEP_SHARED_DATA")


def ray_env() -> dict[str, str]:
    """The environment variables of the job's runtime environment (every worker's)."""
    from hpsweep.store.leases import lease_ttl
    from hpsweep.store.mlflow import code_version

    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    env.update({"HPSWEEP_CODE_VERSION": code_version(), "RAY_CHDIR_TO_TRIAL_DIR": "0",
                "HPSWEEP_LEASE_TTL": str(lease_ttl())})
    return env


def init(address: str | None, env: dict[str, str]) -> None:
    """``ray.init``: join the cluster at ``address``, or start Ray in this process."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": env}
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING",
                 log_to_driver=False)
        return
    # In-process Ray for one machine: every port on loopback (see the top of this module),
    # no dashboard. Ray's default token authentication stays on (the token is under
    # ~/.ray); only its notice about it is kept off the user's screen.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    global _in_process
    watcher = None
    with contextlib.suppress(Exception):  # the embedded Ray ends with this process, from its start
        from ray._common.utils import get_default_ray_temp_dir

        watcher = reaper.watch(get_default_ray_temp_dir())
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, runtime_env=runtime_env,
             logging_level="WARNING", log_to_driver=False, configure_logging=True)
    _in_process = watcher is not None


class Start:
    """In-process Ray starting in a thread that then lives as long as the process."""

    def __init__(self, env: dict[str, str]) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(env,), name="hpsweep-ray-start", daemon=True).start()

    def _run(self, env: dict[str, str]) -> None:
        try:
            init(None, env)
        except BaseException as exc:  # handed to the thread that waits
            self._error = exc
        finally:
            self._ready.set()
        threading.Event().wait()  # never returns: Ray's processes end with this thread

    def wait(self) -> None:
        """Block until Ray is up; raise what its start raised."""
        self._ready.wait()
        if self._error is not None:
            raise self._error


def begin(cell_ids: list[str], storage) -> Start | None:
    """Start in-process Ray now if some of ``cell_ids`` was never held in ``storage`` (so there
    is work to do); None otherwise (the engine starts it if it finds work). ``storage``: the
    opened storage of the sweep, its lease records listed once."""
    if ray.is_initialized() or not cell_ids:
        return None
    held = storage.lease_keys()
    if all(c in held for c in cell_ids):
        return None
    return Start(ray_env())


def cluster_nodes(address: str) -> list[str]:
    """The addresses of the alive nodes of the cluster at ``address`` (connects, then lets go:
    the engine connects again with the trials' runtime environment)."""
    if ray.is_initialized():
        return sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    try:
        return sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})
    finally:
        ray.shutdown()


def leave(code: int) -> None:
    """End the ``hpsweep`` command now, with exit status ``code``, when it started Ray in
    itself and its watcher runs: Ray's own shutdown (about 1.5 s, then the interpreter's
    teardown with Ray and torch loaded: 2.4 s in all, measured) is not worth a person's wait
    once everything is printed. The GCS and the raylet end with this process, and the watcher
    (:mod:`hpsweep.run.reaper`) stops the rest of the session's processes, as it does when a driver
    is killed. Returns (for a normal exit) in any other case."""
    if not _in_process or not ray.is_initialized():
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
