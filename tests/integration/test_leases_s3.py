"""Cell leases on S3 (a real moto_server): conditional writes (If-None-Match / If-Match) give
one winner, expiry and takeover, and refuse renewal by anyone but the holder."""

from __future__ import annotations

import threading
import time

import pytest

from hpsweep.store.leases import DONE, HELD, HeldLease
from hpsweep.store.storage import open_storage

pytestmark = pytest.mark.slow


@pytest.fixture
def s3(moto_server, aws_env):
    bucket = moto_server.create_bucket()
    return open_storage(f"s3://{bucket}/sweeps", moto_server.url), moto_server, bucket


def test_s3_concurrent_acquire_has_one_winner(s3):
    storage, moto, bucket = s3
    for round_ in range(5):
        n, wins = 8, []
        barrier = threading.Barrier(n)

        def go(i):
            s = open_storage(storage.uri, storage.endpoint)  # a client each, as separate drivers
            barrier.wait()
            won, _ = s.try_acquire(f"cell{round_}", f"d{i}", 30.0)
            if won:
                wins.append(i)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1, wins
    assert "sweeps/leases/cell0.json" in moto.keys(bucket, "sweeps/leases/")


def test_s3_expiry_takeover_and_refused_renewal(s3):
    storage, _, _ = s3
    won, a = storage.try_acquire("c", "driver-a", 0.5)
    assert won and a.state == HELD and a.version.startswith('"')
    assert storage.try_acquire("c", "driver-b", 0.5)[0] is False
    renewed = storage.renew(a, 0.5)
    assert renewed is not None and renewed.version != a.version
    # the stale version (before the renewal) no longer matches: refused
    assert storage.renew(a, 30.0) is None
    time.sleep(0.6)
    won, b = storage.try_acquire("c", "driver-b", 30.0)
    assert won and b.owner == "driver-b"
    assert storage.renew(renewed, 30.0) is None and storage.release(renewed, DONE) is False
    assert storage.release(b, DONE, {"run_id": "r"})
    assert storage.read_lease("c").state == DONE
    assert storage.try_acquire("c", "driver-c", 30.0)[0] is False


def test_s3_held_lease_heartbeat(s3):
    storage, _, _ = s3
    held, _ = HeldLease.acquire(storage, "h", "driver-a", ttl=0.9)
    time.sleep(2.0)
    assert storage.read_lease("h").live and held.lost is None
    assert held.end(DONE)
