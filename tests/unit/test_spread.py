"""Drivers started together begin on different cells, but each keeps the plan's promise:
every configuration gets its first seed before any gets a second."""

from __future__ import annotations

from hpsweep.spec.plan import Cell


def test_spread_rotates_within_each_seed_and_keeps_seeds_outermost(monkeypatch) -> None:
    # imported here, not at collection: other unit tests check that a bad sweep file never
    # imports ray.tune in their process
    from hpsweep.run.queue import spread as _spread

    cells = [Cell(f"{seed}-{x}", i, seed, {"x": x}, {"x": x, "seed": seed})
             for i, (seed, x) in enumerate((s, x) for s in (0, 1, 2) for x in range(7))]
    starts = set()
    for driver in ("host:1:a", "host:2:b", "host:3:c", "host:4:d"):
        monkeypatch.setattr("hpsweep.run.queue.driver_id", lambda d=driver: d)
        order = _spread(cells)
        assert sorted(c.id for c in order) == sorted(c.id for c in cells)   # a permutation
        assert [c.seed for c in order] == [c.seed for c in cells]           # seeds outermost
        for seed in (0, 1, 2):  # a rotation of the plan's order within each seed
            xs = [c.params["x"] for c in order if c.seed == seed]
            j = xs.index(0)
            assert xs[j:] + xs[:j] == list(range(7))
        starts.add(order[0].id)
    assert len(starts) > 1, "every driver would contend for the same first cell"
