"""What `hpsweep run` says at the end: every cell counted once (finished here, failed, already
done, finished elsewhere, copied, interrupted), cells taken over named with their new holder,
and the exit status those imply (issue 22)."""

from __future__ import annotations

from hpsweep.run.engine import SweepOutcome


def _outcome(**kw) -> SweepOutcome:
    base = dict(total=12, skipped=0, finished=0, failed=0, interrupted=0, parent_run_id="p",
                experiment_id="1", wall_s=10.0, fit_s=8.0)
    return SweepOutcome(**{**base, **kw})


def test_a_driver_whose_cells_were_taken_over_says_by_whom_and_exits_0() -> None:
    o = _outcome(finished=8, elsewhere=4, taken_over={"vm:12:ab": 4})
    assert o.summary() == [
        "8 cells finished, 0 failed, 0 already done, 4 finished elsewhere, 0 interrupted in 10.0s "
        "(8.0s running trials)",
        "4 cells taken over by vm:12:ab (this driver stalled past their leases; counted above where they ended)"]
    assert o.exit_code == 0


def test_copied_cells_are_counted_as_copied() -> None:
    o = _outcome(skipped=0, elsewhere=12, copied=12)
    assert o.summary()[0].startswith("0 cells finished, 0 failed, 0 already done, 12 finished elsewhere "
                                     "(12 copied from other sweeps), 0 interrupted")
    assert o.exit_code == 0


def test_a_taken_over_cell_that_failed_there_fails_the_run_and_interrupted_cells_give_130() -> None:
    o = _outcome(finished=10, elsewhere=2, elsewhere_failed=1, taken_over={"b": 2}, lost_failed=1)
    assert "1 finished elsewhere, 1 failed elsewhere, 0 interrupted" in o.summary()[0]
    assert o.exit_code == 1
    assert _outcome(finished=10, interrupted=2).exit_code == 130
