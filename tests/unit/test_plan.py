"""Grid expansion: counts, no duplicates, stable ids and order, the seeds axis."""

from __future__ import annotations

import collections
import math

from hpsweep.spec.model import load_spec_text
from hpsweep.spec.plan import cell_id, plan

HEAD = "name: t\ntrainer: sleep\nmetric: {name: loss, mode: min}\n"


def cells_of(text: str):
    return plan(load_spec_text(HEAD + text, "t.yaml"))


def test_grid_product_times_seeds_in_declared_order() -> None:
    cells = cells_of("parameters:\n  x: {grid: [0.0, 1.0, 2.0]}\n  reports: {range: [1, 3]}\nseeds: 2\n")
    assert len(cells) == 3 * 3 * 2
    assert len({c.id for c in cells}) == len(cells)
    # seeds outermost; then x, then reports, as declared
    assert [c.seed for c in cells] == [0] * 9 + [1] * 9
    assert [(c.params["x"], c.params["reports"]) for c in cells[:4]] == [(0.0, 1), (0.0, 2), (0.0, 3), (1.0, 1)]
    assert [c.index for c in cells] == list(range(18))


def test_same_spec_same_cells_and_ids() -> None:
    text = "parameters:\n  x: {pow10: [-2.5, -3, -3.5, -4]}\nseeds: 3\n"
    a, b = cells_of(text), cells_of(text)
    assert [c.id for c in a] == [c.id for c in b]
    assert [c.params for c in a] == [c.params for c in b]


def test_adding_seeds_appends_cells_and_keeps_ids() -> None:
    two = cells_of("parameters:\n  x: {grid: [0.0, 1.0]}\nseeds: 2\n")
    three = cells_of("parameters:\n  x: {grid: [0.0, 1.0]}\nseeds: 3\n")
    assert [c.id for c in three[:len(two)]] == [c.id for c in two]
    assert {c.seed for c in three[len(two):]} == {2}


def test_id_is_the_resolved_config_not_the_spelling() -> None:
    # Spelling out a default value does not change a cell; changing a value does.
    plain = cells_of("parameters:\n  x: {grid: [1.0]}\n")
    spelled = cells_of("config: {reports: 5}\nparameters:\n  x: {grid: [1.0]}\n")
    other = cells_of("config: {reports: 6}\nparameters:\n  x: {grid: [1.0]}\n")
    assert plain[0].id == spelled[0].id != other[0].id
    assert plain[0].config["reports"] == 5 and plain[0].config["seed"] == 0
    assert plain[0].id == cell_id("sleep", plain[0].config)


def test_pow10_values_are_the_papers_learning_rates() -> None:
    cells = cells_of("parameters:\n  x: {pow10: [-2.5, -3, -3.5, -4]}\n")
    assert [c.params["x"] for c in cells] == [10 ** -2.5, 1e-3, 10 ** -3.5, 1e-4]
    assert math.isclose(cells[0].params["x"], 0.0031622776601683794)


def test_variants_union_and_exclude() -> None:
    cells = cells_of(
        "parameters:\n  x: {grid: [0.0, 1.0]}\n"
        "variants:\n  - {reports: 1}\n  - {reports: 2, sleep: {grid: [0.0, 0.1]}}\n"
        "exclude:\n  - {reports: 2, x: [1.0]}\n")
    combos = [(c.params["x"], c.params["reports"], c.params.get("sleep")) for c in cells]
    assert combos == [(0.0, 1, None), (1.0, 1, None), (0.0, 2, 0.0), (0.0, 2, 0.1)]


def test_duplicate_points_from_overlapping_variants_run_once() -> None:
    cells = cells_of("variants:\n  - {x: 1.0}\n  - {x: {grid: [1.0, 2.0]}}\n")
    assert [c.params["x"] for c in cells] == [1.0, 2.0]


def test_random_search_draws_fixed_samples_within_bounds() -> None:
    text = ("parameters:\n  x: {uniform: [-1, 1]}\n  reports: {randint: [1, 4]}\n"
            "  sleep: {loguniform: [1.0e-4, 1.0e-1]}\nsearch: {algorithm: random, samples: 400}\n")
    cells = cells_of(text)
    again = cells_of(text)
    assert [c.id for c in cells] == [c.id for c in again]
    assert len(cells) == 400
    xs = [c.params["x"] for c in cells]
    reports = collections.Counter(c.params["reports"] for c in cells)
    logs = [math.log10(c.params["sleep"]) for c in cells]
    assert all(-1 <= x <= 1 for x in xs) and set(reports) == {1, 2, 3, 4}
    # Statistical checks (5 sigma): uniform mean 0 with sd 1/sqrt(3); log-uniform mean -2.5.
    n = len(xs)
    assert abs(sum(xs) / n) < 5 * (1 / math.sqrt(3)) / math.sqrt(n)
    assert abs(sum(logs) / n + 2.5) < 5 * (3 / math.sqrt(12)) / math.sqrt(n)
    for k in (1, 2, 3, 4):
        assert abs(reports[k] - n / 4) < 5 * math.sqrt(n * 0.25 * 0.75)


def test_optuna_cells_are_not_known_in_advance() -> None:
    assert cells_of("parameters:\n  x: {uniform: [0, 1]}\nsearch: {algorithm: optuna, samples: 5}\n") == []
