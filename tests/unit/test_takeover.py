"""A runner that lost its cell's lease (another runner took the cell over) drops what it had
not sent. Against the recording MlflowClient stand-in of test_tracking (the real thing, with
the steps a taken-over run already has not sent twice: tests/integration/test_many_drivers.py;
the skipping of those steps itself: test_tracking)."""

from __future__ import annotations

from test_tracking import FakeClient, make


def test_an_abandoned_tracker_sends_nothing_more(monkeypatch) -> None:
    client, writes = FakeClient(), []
    tracker = make(monkeypatch, client, writes)
    assert tracker.run_id == "new-run"
    tracker.flush()
    before = list(client.events)
    tracker.abandon()
    tracker.log(5, {"loss": 1.0}, checkpoint=b"state")
    tracker._thread.join(timeout=5)
    assert not tracker._thread.is_alive()
    assert client.events == before and not writes
