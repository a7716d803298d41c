"""``--set FIELD=VALUE``: applied to the parsed file before validation, checked exactly as the
file is, each problem naming its override in one line; cell ids follow what a trainer sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpsweep.cli import main
from hpsweep.errors import UsageError
from hpsweep.spec.model import SpecError, load_spec, load_spec_text
from hpsweep.spec.plan import plan

SWEEP = """\
name: t
trainer: sleep
config:
  reports: 3
  sleep: 0.0
parameters:
  x: {grid: [0.0, 1.0]}
variants:
  - {fail_at: -1}
seeds: 2
metric: {name: loss, mode: min}
resources: {cpus: 1, gpus: 0.25}
"""


def _load(*overrides: str):
    return load_spec_text(SWEEP, "s.yaml", overrides=overrides)


def _problems(*overrides: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        _load(*overrides)
    return str(info.value).splitlines()


# every kind of field: top-level scalars, nested models, the trainer config, swept domains,
# lists by index, whole values in YAML flow style, fields the file leaves out
@pytest.mark.parametrize(("override", "check"), [
    ("seeds=1", lambda s: s.seed_list == [0]),
    ("seeds=[3, 4]", lambda s: s.seed_list == [3, 4]),
    ("name=t-small", lambda s: s.name == "t-small"),
    ("retries=0", lambda s: s.retries == 0),
    ("bundle=1", lambda s: s.bundle == 1),
    ("resources.gpus=0", lambda s: s.resources.gpus == 0 and s.resources.cpus == 1),
    ("resources.memory=2GiB", lambda s: s.resources.memory == 2 * 2**30),
    ("resources.custom.special=1", lambda s: s.resources.custom == {"special": 1}),
    ("metric.mode=max", lambda s: s.metric.mode == "max"),
    ("scheduler={type: asha, max_t: 3}", lambda s: s.scheduler.type == "asha" and s.scheduler.max_t == 3),
    ("search.algorithm=grid", lambda s: s.search.algorithm == "grid"),
    ("checkpoint.every=5", lambda s: s.checkpoint.every == 5),
    ("config.reports=200", lambda s: s.config == {"reports": 200, "sleep": 0.0}),
    ("config.extra_metrics=2", lambda s: s.config["extra_metrics"] == 2),
    ("parameters.x.grid=[0.5]", lambda s: len(plan(s)) == 2 and {c.params["x"] for c in plan(s)} == {0.5}),
    ("parameters.x={grid: [1, 2, 3]}", lambda s: len(plan(s)) == 6),
    ("variants.0.fail_at=7", lambda s: {c.config["fail_at"] for c in plan(s)} == {7}),
    ("max_concurrent=3", lambda s: s.max_concurrent == 3),
])
def test_every_kind_of_field(override, check) -> None:
    spec = _load(override)
    assert check(spec), override
    assert spec._sources.overridden() == [override]


def test_later_overrides_win_and_the_file_is_untouched_otherwise() -> None:
    spec = _load("config.reports=5", "config.reports=6")
    assert spec.config["reports"] == 6
    assert spec.resources.gpus == 0.25
    assert _load().config["reports"] == 3


# a wrong path and a wrong type: one line each, naming the override and the file it applies to
@pytest.mark.parametrize(("override", "message"), [
    ("config.reports=abc", "--set config.reports=abc (s.yaml): config.reports: must be an integer, got 'abc'"),
    ("resources.gpus=lots", "--set resources.gpus=lots (s.yaml): resources.gpus: Input should be a valid number, "
                            "unable to parse string as a number, got 'lots'"),
    ("resources.gpus=1.5", "--set resources.gpus=1.5 (s.yaml): resources.gpus: more than one GPU must be a "
                           "whole number, got gpus=1.5"),
    ("resources.memory=3XB", "--set resources.memory=3XB (s.yaml): resources.memory: must be bytes or a size with "
                             "a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 16GiB, got '3XB'"),
    ("seeds=0", "--set seeds=0 (s.yaml): seeds: a seed count must be >= 1, got seeds=0"),
    ("metric.mode=up", "--set metric.mode=up (s.yaml): metric.mode: Input should be 'min' or 'max', got 'up'"),
    ("confg.reports=1", "--set confg.reports=1 (s.yaml): confg: unknown key (did you mean 'config'?)"),
    ("resources.gpu=0", "--set resources.gpu=0 (s.yaml): resources.gpu: unknown key (did you mean 'gpus'?)"),
    ("config.reportz=1", "--set config.reportz=1 (s.yaml): config.reportz: unknown option of "
                         "trainers.sleep.Config "
                         "(did you mean 'reports'?)"),
    ("seeds.first=1", "--set seeds.first=1 (s.yaml): seeds.first: seeds is 2, not a mapping: set seeds itself"),
    ("max_concurrent.x=1", "--set max_concurrent.x=1 (s.yaml): max_concurrent: max_concurrent is 0 (its "
                           "default), not a mapping: set max_concurrent itself"),
    ("variants.4.x=1", "--set variants.4.x=1 (s.yaml): variants.4: variants is a list of 1: give an index "
                       "from 0 to 0"),
    ("metric.name.x=1", "--set metric.name.x=1 (s.yaml): metric.name.x: metric.name is 'loss', not a mapping: "
                        "set metric.name itself"),
])
def test_a_wrong_path_or_type_is_one_clear_line(override, message) -> None:
    assert _problems(override) == [message]


def test_every_problem_at_once_with_the_files_own() -> None:
    with pytest.raises(SpecError) as info:
        load_spec_text(SWEEP + "retries: -1\n", "s.yaml", overrides=["seeds=0", "confg.x=1"])
    assert str(info.value).splitlines() == [
        "--set confg.x=1 (s.yaml): confg: unknown key (did you mean 'config'?)",
        "--set seeds=0 (s.yaml): seeds: a seed count must be >= 1, got seeds=0",
        "s.yaml:13: retries: Input should be greater than or equal to 0, got -1",
    ]


@pytest.mark.parametrize("text", ["nonsense", "=1", "config..x=1", "x=[1, 2"])
def test_a_malformed_flag_is_a_usage_error(text) -> None:
    with pytest.raises(UsageError, match=r"--set "):
        _load(text)


def test_cell_ids_follow_what_the_trainer_sees() -> None:
    paper = {c.id for c in plan(_load())}
    assert len(paper) == 4
    # resources are not the cell: the same cells, the same results
    assert {c.id for c in plan(_load("resources.gpus=0"))} == paper
    # fewer seeds: a subset of the same cells
    assert {c.id for c in plan(_load("seeds=1"))} < paper
    # a config value the trainer sees: other cells, never mixed with the file's
    scaled = {c.id for c in plan(_load("config.reports=2"))}
    assert len(scaled) == 4 and not scaled & paper
    # spelling out the default is the same config, so the same cells
    assert {c.id for c in plan(_load("config.extra_metrics=0"))} == paper
    # and the same ids as the file edited by hand
    edited = load_spec_text(SWEEP.replace("reports: 3", "reports: 2"), "s.yaml")
    assert {c.id for c in plan(edited)} == scaled


def test_sources_say_where_a_value_came_from() -> None:
    spec = _load("resources.gpus=0")
    assert spec._sources.where("resources", "gpus") == "--set resources.gpus=0"
    assert spec._sources.where("resources", "cpus") == "s.yaml:12"
    assert spec._sources.where("resources", "memory") == "s.yaml (default)"


def test_cli_validate_takes_set_and_exits_2_naming_it(tmp_path, capsys) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP)
    assert main(["validate", str(path), "--set", "seeds=1", "--set", "config.reports=2"]) == 0
    assert "2 cells" in capsys.readouterr().out
    assert main(["validate", str(path), "--set", "config.reports=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"--set config.reports=abc ({path}): config.reports: must be an integer, got 'abc'"


def test_every_command_that_reads_a_sweep_takes_set(tmp_path) -> None:
    """One flag on validate, run, submit, status, results and report, with its help; no
    traceback for a malformed one (a subprocess: what a user's shell sees)."""
    from hpsweep.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("validate", "run", "submit", "status", "results", "report"):
        args = sub.choices[name].parse_args(["s.yaml", "--set", "a=1", "--set", "b.c=2"])
        assert args.overrides == ["a=1", "b.c=2"], name
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP)
    out = subprocess.run([sys.executable, "-m", "hpsweep.cli", "results", str(path), "--set", "oops"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == ("--set oops: expected FIELD=VALUE with a dotted field, e.g. "
                                  "--set resources.gpus=0 or --set config.steps=200")


def test_submit_passes_the_overrides_to_the_job(tmp_path, monkeypatch) -> None:
    from hpsweep.cluster.jobs import build_submission

    project = tmp_path / "p"
    (project / "sweeps").mkdir(parents=True)
    (project / "sweeps" / "s.yaml").write_text(SWEEP)
    monkeypatch.chdir(project)
    sub = build_submission(Path("sweeps/s.yaml"), tracking_uri="http://mlflow:5000",
                           storage="s3://b/p", overrides=["resources.gpus=0", "config.reports=2"],
                           node_wait=60)
    assert sub["entrypoint"].endswith("--node-wait 60 --set resources.gpus=0 --set config.reports=2")
    with pytest.raises(SpecError, match=r"--set config.reports=x \(sweeps/s.yaml\)"):
        build_submission(Path("sweeps/s.yaml"), overrides=["config.reports=x"])
    assert json.dumps(sub)  # what the Jobs API is sent stays plain data


def test_load_spec_from_a_file(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP)
    assert load_spec(path, ["seeds=1"]).seed_list == [0]
