"""A cell's tracker sends fewer, larger batches while the tracking server is slow, and still every
step once, in order (issue 24: 64 workers each sending a batch a second saturate one server).

The client here stands in for a saturated server (each batch takes ``delay`` seconds to answer),
which a real `mlflow server` cannot be made to be on purpose; it records what it was sent."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from hpsweep.spec.plan import Cell
from hpsweep.store import tracker as tracking


class SlowServer:
    def __init__(self, delay: float) -> None:
        self.delay, self.batches, self.points = delay, 0, []
        self.status = None
        self.lock = threading.Lock()

    def create_run(self, experiment_id, tags=None, run_name=None, start_time=None):
        return SimpleNamespace(info=SimpleNamespace(run_id="r1"))

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        time.sleep(self.delay)
        with self.lock:
            self.batches += 1 if metrics else 0
            self.points += [(m.key, m.step) for m in metrics]

    def set_terminated(self, run_id, status=None, end_time=None):
        self.status = status


def _run(monkeypatch, delay: float, steps: int = 40, every: float = 0.05) -> tuple[SlowServer, float]:
    server = SlowServer(delay)
    monkeypatch.setattr(tracking, "worker_client", lambda uri: server)
    monkeypatch.setattr(tracking, "_FLUSH_S", 0.1)
    cell = Cell("c1", 0, 0, {"x": 1}, {"x": 1, "seed": 0})
    tracker = tracking.CellTracker("http://unused", "1", "p", "s", cell, fresh=True)
    widest = 0.0
    for step in range(1, steps + 1):
        tracker.log(step, {"loss": 1.0 / step, "score": -1.0 / step})
        widest = max(widest, tracker.interval)
        time.sleep(every)
    tracker.finish("FINISHED")
    return server, widest


@pytest.mark.parametrize("delay", [0.0, 0.1])
def test_every_step_once_in_order_whatever_the_round_trip(monkeypatch, delay):
    server, _ = _run(monkeypatch, delay)
    for key in ("loss", "score"):
        assert [s for k, s in server.points if k == key] == list(range(1, 41))
    assert server.status == "FINISHED"


def test_a_slow_server_gets_fewer_larger_batches(monkeypatch):
    fast, _ = _run(monkeypatch, 0.0)
    slow, slow_interval = _run(monkeypatch, 0.1)
    assert slow_interval >= tracking._FLUSH_BACKOFF * 0.1   # four round trips between batches
    assert slow.batches < fast.batches / 2, (slow.batches, fast.batches)
    assert len(slow.points) == len(fast.points) == 80
