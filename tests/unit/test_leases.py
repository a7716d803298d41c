"""Cell leases on a local directory (hpsweep.storage): one winner under contention, expiry
and takeover, renewal and release only by the holder. The same primitives on S3 (moto_server)
are in tests/integration/test_leases_s3.py."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time

import pytest

from hpsweep.store.leases import DONE, FAILED, HELD, HeldLease, LeaseLost
from hpsweep.store.storage import open_storage


@pytest.fixture
def storage(tmp_path):
    return open_storage(str(tmp_path / "store"))


def _contend(root: str, key: str, barrier, results) -> None:
    s = open_storage(root)
    barrier.wait()
    won, lease = s.try_acquire(key, f"p{multiprocessing.current_process().pid}", 30.0)
    results.put((won, lease.holder if lease else None))


def test_processes_racing_for_one_cell_have_one_winner(storage):
    ctx = multiprocessing.get_context("fork")
    n = 8
    for round_ in range(5):
        key = f"cell{round_}"
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(storage.root, key, barrier, results)) for _ in range(n)]
        for p in procs:
            p.start()
        got = [results.get(timeout=30) for _ in range(n)]
        for p in procs:
            p.join(timeout=30)
        winners = [h for won, h in got if won]
        assert len(winners) == 1, got
        # every loser was shown the winner's record
        assert {h for won, h in got if not won} == {winners[0]}
        assert storage.read_lease(key).holder == winners[0]


def test_threads_racing_have_one_winner(storage):
    n, wins = 16, []
    barrier = threading.Barrier(n)

    def go(i):
        barrier.wait()
        won, _ = storage.try_acquire("c", f"t{i}", 30.0)
        if won:
            wins.append(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_live_lease_is_refused_expired_one_is_taken_over(storage):
    won, a = storage.try_acquire("c", "driver-a", 0.5)
    assert won and a.live and a.state == HELD and a.owner == "driver-a"
    won, seen = storage.try_acquire("c", "driver-b", 0.5)
    assert not won and seen.holder == a.holder and seen.owner == "driver-a"
    time.sleep(0.6)
    assert not storage.read_lease("c").live
    won, b = storage.try_acquire("c", "driver-b", 30.0)
    assert won and b.owner == "driver-b" and b.holder != a.holder
    # the old holder can no longer renew or release it
    assert storage.renew(a, 30.0) is None
    assert storage.release(a, DONE) is False
    assert storage.read_lease("c").holder == b.holder


def test_renewal_extends_and_only_the_holder_may_renew(storage):
    won, a = storage.try_acquire("c", "driver-a", 1.0)
    renewed = storage.renew(a, 5.0)
    assert renewed is not None and renewed.expires > a.expires + 3
    # a forged lease: same key, another holder
    forged = type(a)(a.key, HELD, "not-the-holder", "driver-b", a.expires, {}, a.version)
    assert storage.renew(forged, 30.0) is None
    assert storage.release(forged, FAILED) is False
    assert storage.read_lease("c").holder == a.holder


def test_terminal_states(storage):
    won, a = storage.try_acquire("c", "driver-a", 30.0, info={"sweep": "s1"})
    assert storage.release(a, DONE, {"run_id": "r1"})
    done = storage.read_lease("c")
    assert done.state == DONE and done.info == {"sweep": "s1", "run_id": "r1"} and not done.live
    # a done cell is not taken (its run is finished) unless asked explicitly
    assert storage.try_acquire("c", "driver-b", 30.0)[0] is False
    won, b = storage.try_acquire("c", "driver-b", 30.0, over=(DONE,))
    assert won
    assert storage.release(b, FAILED)
    won, c = storage.try_acquire("c", "driver-c", 30.0)  # a failed cell may be retried
    assert won and c.owner == "driver-c"


def test_torn_record_counts_as_absent(storage):
    path = storage.lease_path("c")
    storage.try_acquire("c", "a", 30.0)
    with open(path, "w") as f:
        f.write('{"key": "c", "sta')   # a writer killed mid-write
    assert storage.read_lease("c") is None
    assert storage.try_acquire("c", "b", 30.0)[0]
    assert json.loads(open(path).read())["owner"] == "b"


def test_held_lease_renews_in_the_background_and_notices_a_takeover(storage):
    held, other = HeldLease.acquire(storage, "c", "driver-a", ttl=0.6)
    assert held is not None and other is None
    time.sleep(1.5)  # well past the ttl: the heartbeat kept it alive
    assert storage.read_lease("c").live
    assert HeldLease.acquire(storage, "c", "driver-b", ttl=0.6)[0] is None
    held.check()
    assert held.end(DONE, {"run_id": "r"})
    assert storage.read_lease("c").state == DONE

    held, _ = HeldLease.acquire(storage, "d", "driver-a", ttl=0.6)
    held._stop.set()          # the holder stalls: no more renewals
    held._thread.join()
    time.sleep(0.7)
    won, taker = storage.try_acquire("d", "driver-b", 30.0)
    assert won
    held._stop.clear()        # it wakes up: the next renewal is refused
    held._thread = threading.Thread(target=held._beat, daemon=True)
    held._thread.start()
    time.sleep(0.5)
    with pytest.raises(LeaseLost, match="driver-b"):
        held.check()
    assert held.end(DONE) is False and storage.read_lease("d").holder == taker.holder


def test_lock_is_mutually_exclusive(storage):
    inside, overlap = [], []

    def go():
        for _ in range(5):
            with storage.lock("parent"):
                inside.append(1)
                if len(inside) > 1:
                    overlap.append(1)
                time.sleep(0.005)
                inside.pop()

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap


def test_live_leases_lists_only_live_holders(storage):
    storage.try_acquire("a", "driver-a", 30.0)
    won, b = storage.try_acquire("b", "driver-b", 30.0)
    storage.release(b, DONE)
    storage.try_acquire("c", "driver-c", 0.01)
    time.sleep(0.05)
    assert storage.lease_keys() == {"a", "b", "c"}
    assert {k: v.owner for k, v in storage.live_leases(["a", "b", "c", "d"]).items()} == {"a": "driver-a"}


@pytest.mark.slow  # the first use of a SQLite store migrates its schema: ~10 s
def test_status_shows_cells_a_driver_holds_as_running(tmp_path, capsys):
    from hpsweep.cli import main
    from hpsweep.spec.model import load_spec
    from hpsweep.spec.plan import plan

    good = tmp_path / "good.yaml"
    good.write_text("name: t\ntrainer: sleep\nmetric: {name: loss, mode: min}\n"
                    "parameters:\n  x: {grid: [0.0, 1.0]}\nseeds: 2\n")
    store = open_storage(str(tmp_path / "store"))
    cells = plan(load_spec(str(good)))
    store.try_acquire(cells[0].id, "host:123:abc", 30.0)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["status", str(good), "--tracking-uri", uri, "--storage", store.root]) == 0
    out = capsys.readouterr().out
    assert "running 1" in out and "pending 3" in out
    assert "running by driver host:123:abc: 1 cells" in out


def test_a_slow_lock_holder_keeps_the_lock_past_the_ttl(storage, monkeypatch):
    monkeypatch.setenv("HPSWEEP_LEASE_TTL", "0.3")
    entered = []

    def second():
        with storage.lock("parent"):
            entered.append(time.time())

    with storage.lock("parent"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(1.2)  # four TTLs: the heartbeat keeps the lock ours
        left = time.time()
    t.join()
    assert entered and entered[0] >= left


def test_status_marks_running_cells_without_a_live_lease_stale():
    from types import SimpleNamespace

    from hpsweep.store.runs import SweepRuns
    from hpsweep.views.stats import completeness
    from hpsweep.views.tables import with_leases

    cells = [SimpleNamespace(id=f"c{i}", params={"x": i}, seed=0) for i in range(4)]
    runs = SweepRuns("s", None, "1", "p", {
        "c0": SimpleNamespace(status="running", run_id="r0"),   # its driver alive
        "c1": SimpleNamespace(status="running", run_id="r1"),   # its driver killed
        "c2": SimpleNamespace(status="failed", run_id="r2"),    # taken over, running again
        "c3": SimpleNamespace(status="done", run_id="r3"),
    })
    seen = with_leases(completeness(cells, runs), {"c0": "host:1", "c2": "host:2"})
    assert [c.state for c in seen.cells] == ["running", "stale", "running", "done"]
    assert seen.counts == {"done": 1, "stopped": 0, "running": 2, "failed": 0, "interrupted": 0, "pending": 0,
                           "stale": 1}
    assert [c.state for _, by_seed in seen.rows for c in by_seed.values()] == [c.state for c in seen.cells]


def test_status_shows_interrupted_cells_as_interrupted_with_a_legend():
    """A KILLED run (a Ctrl-C: resumable) is not a failure (issue 22)."""
    from types import SimpleNamespace

    from rich.console import Console

    from hpsweep.store.runs import SweepRuns, run_state
    from hpsweep.views.stats import completeness
    from hpsweep.views.tables import status_table

    assert [run_state(s) for s in ("FINISHED", "RUNNING", "KILLED", "FAILED")] == \
        ["done", "running", "interrupted", "failed"]
    cells = [SimpleNamespace(id=f"c{i}", params={"x": i}, seed=0) for i in range(2)]
    runs = SweepRuns("s", None, "1", "p", {"c0": SimpleNamespace(status=run_state("KILLED"), run_id="r0"),
                                           "c1": SimpleNamespace(status=run_state("FAILED"), run_id="r1")})
    matrix = completeness(cells, runs)
    assert (matrix.counts["interrupted"], matrix.counts["failed"]) == (1, 1)
    table = status_table(matrix, "s")
    assert "○ interrupted" in table.caption
    console = Console(record=True, width=120)
    console.print(table)
    text = console.export_text()
    assert text.count("○") == 2 and text.count("✗") == 2, text   # a mark each, and the legend
