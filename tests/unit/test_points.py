"""Each distinct config validated once, in the planning process; ids built in pieces equal the
plain hash; validating a sweep imports no torch and no Ray; every config problem at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpsweep.spec.model import SpecError, load_spec_text
from hpsweep.spec.plan import cell_id, plan

ROOT = Path(__file__).resolve().parents[2]
HEAD = "name: t\ntrainer: sleep\nmetric: {name: loss, mode: min}\n"


@pytest.mark.parametrize("trainer, text", [
    ("sleep", HEAD + "parameters:\n  x: {grid: [0, 1.5, -2]}\n  reports: {range: [1, 3]}\nseeds: [3, 11]\n"),
    ("sleep", HEAD + "config: {sleep: 0.0}\nparameters:\n  x: {uniform: [-1, 1]}\nsearch: {algorithm: random, samples: 20}\n"),
    ("mbpa", "name: m\ntrainer: mbpa\nmetric: {name: acc/mean, mode: max}\nconfig: {data_dir: /d}\n"
    "parameters:\n  alpha: {grid: [0.1, 1]}\nvariants:\n  - {method: sgd}\n  - {method: mbpa, steps: {range: [1, 2]}}\nseeds: 2\n"),
])
def test_ids_built_in_pieces_equal_the_plain_hash(trainer: str, text: str) -> None:
    cells = plan(load_spec_text(text, "t.yaml"))
    assert cells
    for c in cells:
        assert c.id == cell_id(trainer, c.config)
        assert json.loads(json.dumps(c.config)) == c.config and c.config["seed"] == c.seed


def test_an_int_for_a_float_field_resolves_to_the_float_id() -> None:
    a = plan(load_spec_text(HEAD + "parameters:\n  x: {grid: [1]}\n", "t.yaml"))
    b = plan(load_spec_text(HEAD + "parameters:\n  x: {grid: [1.0]}\n", "t.yaml"))
    assert a[0].config["x"] == 1.0 and isinstance(a[0].config["x"], float)
    assert a[0].id == b[0].id


def test_every_wrong_typed_config_field_in_one_pass() -> None:
    with pytest.raises(SpecError) as info:
        load_spec_text(HEAD + "config:\n  reports: two\n  sleep: fast\n", "s.yaml")
    assert str(info.value).splitlines() == [
        "s.yaml:5: config.reports: must be an integer, got 'two'",
        "s.yaml:6: config.sleep: must be a number, got 'fast'",
    ]


def test_no_silent_coercion_of_text_to_numbers() -> None:
    with pytest.raises(SpecError, match=r"config.reports: must be an integer, got '1'"):
        load_spec_text(HEAD + "config: {reports: '1'}\n", "s.yaml")
    with pytest.raises(SpecError, match=r"config.reports: must be an integer, got True"):
        load_spec_text(HEAD + "config: {reports: true}\n", "s.yaml")


def test_a_bad_fixed_value_is_reported_once_at_its_own_line() -> None:
    text = HEAD + "config:\n  reports: 2\n  sleep: -1\nparameters:\n  x: {grid: [0.0, 1.0, 2.0]}\n"
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "s.yaml")
    assert str(info.value).splitlines() == ["s.yaml:6: config: sleep must be >= 0, got sleep=-1.0"]


def test_a_swept_value_breaking_an_invariant_names_its_cell_once() -> None:
    text = HEAD + "parameters:\n  reports: {grid: [0, 1, 2]}\n  x: {grid: [0.0, 1.0]}\n"
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "s.yaml")
    assert str(info.value).splitlines() == [
        "s.yaml:5: parameters.reports: reports must be >= 1, got reports=0 (in the cell with reports=0)"]


def test_validate_of_a_large_grid_imports_no_torch_nor_ray(tmp_path: Path) -> None:
    sweep = tmp_path / "big.yaml"
    values = ", ".join(str(v) for v in range(10))
    sweep.write_text(HEAD + "config: {sleep: 0.0}\nparameters:\n"
                     f"  x: {{grid: [{values}]}}\n  reports: {{range: [1, 10]}}\n"
                     f"  extra_metrics: {{range: [0, 9]}}\n  fail_at: {{range: [-1, 8]}}\nseeds: 10\n")
    script = (
        "import sys\nfrom hpsweep.cli import main\n"
        f"code = main(['validate', {str(sweep)!r}])\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'numpy', 'mlflow') if m in sys.modules)\n"
        "print('HEAVY', heavy, 'CODE', code)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert "100000 cells" in out.stdout, out.stdout + out.stderr
    assert "HEAVY [] CODE 0" in out.stdout, out.stdout + out.stderr
