"""A cell's checkpoint, fenced by its lease (hpsweep.store.checkpoints), on a real local storage:
published only by the lease's holder, never going back, carried to the next holder; an unreadable
one set aside (the cell starts again), an unsafe one refused."""

from __future__ import annotations

import pickle
import time

import pytest

from hpsweep.store.checkpoints import CellCheckpoint, stored_checkpoint
from hpsweep.store.leases import DONE, HeldLease, LeaseLost
from hpsweep.store.storage import open_storage
from hpsweep.trainer.checkpoint import PLAIN, UnsafeCheckpoint, dump_state, load_state

TTL = 0.6


def _take(storage, owner: str) -> HeldLease:
    held, other = HeldLease.acquire(storage, "cell1", owner, ttl=TTL)
    assert held is not None, other
    return held


def _files(storage) -> list[str]:
    folder = storage.local_path("sw", "cells", "cell1")
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_stalled_holder_cannot_publish_and_its_object_is_removed(tmp_path) -> None:
    storage = open_storage(str(tmp_path))
    a = _take(storage, "driver-a")
    ckpt_a = CellCheckpoint(storage, "sw", "exp", "cell1", a)
    ckpt_a.publish(dump_state({"step": 5}), 5, "run-a")
    a._stop.set()                 # A stalls: no renewals ...
    time.sleep(TTL + 0.2)         # ... past its lease
    b = _take(storage, "driver-b")
    assert b.epoch == a.epoch + 1
    ckpt_b = CellCheckpoint(storage, "sw", "exp", "cell1", b)
    assert ckpt_b.resume_from["step"] == 5 and ckpt_b.resume_from["run_id"] == "run-a"  # carried over
    # A wakes up and writes a later step than B has, its pause having fallen between its check
    # and its write: refused, the pointer stays B's to move
    a.check = lambda: None
    with pytest.raises(LeaseLost, match="driver-b"):
        ckpt_a.publish(dump_state({"step": 7}), 7, "run-a")
    data, pointer = stored_checkpoint(storage, "sw", "cell1")
    assert (pointer["step"], load_state(data)) == (5, {"step": 5})
    assert _files(storage) == ["1.5.checkpoint.pt"]    # A's step-7 object is gone again
    ckpt_b.publish(dump_state({"step": 6}), 6, "run-b")
    assert _files(storage) == ["2.6.checkpoint.pt"]    # the one it replaced is deleted
    assert b.end(DONE) and stored_checkpoint(storage, "sw", "cell1")[1]["run_id"] == "run-b"


def test_an_unreadable_checkpoint_is_set_aside_and_the_cell_starts_again(tmp_path) -> None:
    storage = open_storage(str(tmp_path))
    a = _take(storage, "driver-a")
    CellCheckpoint(storage, "sw", "exp", "cell1", a).publish(dump_state({"step": 3}), 3, "run-a")
    a.end("stopped")
    (storage.local_path("sw", "cells", "cell1") / "1.3.checkpoint.pt").write_bytes(b"\x00garbage\xff" * 10)
    b = _take(storage, "driver-b")
    resume, warning = CellCheckpoint(storage, "sw", "exp", "cell1", b).checked(label="x=1")
    assert resume is None
    assert "1.3.checkpoint.pt" in warning and "unreadable" in warning and "from scratch" in warning, warning
    names = _files(storage)
    assert len(names) == 1 and names[0].startswith("1.3.checkpoint.pt.corrupt-"), names
    assert names[0] in warning
    assert stored_checkpoint(storage, "sw", "cell1") is None   # the pointer is gone too
    b.end("stopped")
    c = _take(storage, "driver-c")   # the next attempt is not warned again
    assert CellCheckpoint(storage, "sw", "exp", "cell1", c).checked() == (None, "")


def test_an_unsafe_checkpoint_stays_refused(tmp_path) -> None:
    storage = open_storage(str(tmp_path))
    a = _take(storage, "driver-a")
    evil = PLAIN + pickle.dumps(time.sleep)   # names a global: never unpickled
    CellCheckpoint(storage, "sw", "exp", "cell1", a).publish(evil, 2, "run-a")
    a.end("stopped")
    b = _take(storage, "driver-b")
    with pytest.raises(UnsafeCheckpoint, match=r"1\.2\.checkpoint\.pt: refused to load"):
        CellCheckpoint(storage, "sw", "exp", "cell1", b).checked()
    assert _files(storage) == ["1.2.checkpoint.pt"]   # left where it is, for a person to look at


def test_another_sweeps_pointer_is_not_resumed_from(tmp_path) -> None:
    storage = open_storage(str(tmp_path))
    a = _take(storage, "driver-a")
    CellCheckpoint(storage, "other", "exp0", "cell1", a).publish(dump_state({"step": 3}), 3, "run-a")
    a.end("stopped")
    b = _take(storage, "driver-b")
    assert CellCheckpoint(storage, "sw", "exp", "cell1", b).resume_from is None
