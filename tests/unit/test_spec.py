"""The sweep YAML: every bad input gets an exact message with file, line and field."""

from __future__ import annotations

import tracemalloc

import pytest

from hpsweep.spec.model import SpecError, json_schema, load_spec, load_spec_text

HEAD = "name: t\ntrainer: sleep\nmetric: {name: loss, mode: min}\n"

# (yaml text, the exact messages, in order)
BAD = [
    ("", ["bad.yaml: the file is empty; a sweep needs at least name, trainer and metric (see sweeps/README.md)"]),
    ("# only a comment\n", ["bad.yaml: the file is empty; a sweep needs at least name, trainer and metric (see sweeps/README.md)"]),
    ("- a\n- b\n", ["bad.yaml:1: a sweep file must be a mapping of keys, got a list"]),
    ("just text\n", ["bad.yaml:1: a sweep file must be a mapping of keys, got a str"]),
    ("name: t\nparameters: {x: [1, 2\n", ["bad.yaml:3: YAML syntax error: expected ',' or ']', but got '<stream end>'"]),
    ("name: t\n  trainer: sleep\n", ["bad.yaml:2: YAML syntax error: mapping values are not allowed here"]),
    (HEAD + "name: u\n", ["bad.yaml:4: name: duplicate key (first defined on line 1); remove one of them"]),
    (HEAD + "num_sample: 3\n", ["bad.yaml:4: num_sample: unknown key (known keys: name, description, "
                               "trainer, config, parameters, variants, exclude, seeds, metric, search, "
                               "scheduler, resources, max_concurrent, retries, bundle, checkpoint, selection, claims, requirements)"]),
    (HEAD + "search: {algorithm: random, num_sample: 3}\n",
     ["bad.yaml:4: search.num_sample: unknown key (did you mean 'samples'?)"]),
    (HEAD + "sceduler: {type: fifo}\n", ["bad.yaml:4: sceduler: unknown key (did you mean 'scheduler'?)"]),
    (HEAD + "scheduler: {type: asha, max_tt: 3}\n", ["bad.yaml:4: scheduler.max_tt: unknown key (did you mean 'max_t'?)"]),
    (HEAD + "scheduler: {type: hyperband}\n", ["bad.yaml:4: scheduler: type must be 'fifo' or 'asha'"]),
    (HEAD + "scheduler: {type: asha, max_t: 2, grace_period: 5}\n",
     ["bad.yaml:4: scheduler: grace_period must be <= max_t, got grace_period=5 max_t=2"]),
    (HEAD + "parameters:\n  x: {grid: []}\n", ["bad.yaml:5: parameters.x.grid: grid needs at least one value, got an empty list"]),
    (HEAD + "parameters:\n  x: {uniform: [2, 1]}\nsearch: {algorithm: random, samples: 2}\n",
     ["bad.yaml:5: parameters.x.uniform: low must be < high, got low=2.0 high=1.0"]),
    (HEAD + "parameters:\n  x: {loguniform: [0, 1]}\nsearch: {algorithm: random, samples: 2}\n",
     ["bad.yaml:5: parameters.x.loguniform: low must be > 0 for a log scale, got low=0.0"]),
    (HEAD + "parameters:\n  reports: {range: [5, 1]}\n", ["bad.yaml:5: parameters.reports.range: low must be <= high, got low=5 high=1"]),
    (HEAD + "parameters:\n  x: {gird: [1]}\n",
     ["bad.yaml:5: parameters.x: must be a mapping with exactly one key: one of grid, pow10, range, choice, uniform, loguniform, randint"]),
    (HEAD + "parameters:\n  x: [1, 2]\n",
     ["bad.yaml:5: parameters.x: must be a mapping with exactly one key: one of grid, pow10, range, choice, uniform, loguniform, randint"]),
    (HEAD + "parameters:\n  x: {uniform: [0, 1]}\n",
     ["bad.yaml:5: parameters.x: a sampled domain needs search.algorithm random or optuna (or use grid / pow10 / range values)"]),
    (HEAD + "seeds: 0\n", ["bad.yaml:4: seeds: a seed count must be >= 1, got seeds=0"]),
    (HEAD + "seeds: -2\n", ["bad.yaml:4: seeds: a seed count must be >= 1, got seeds=-2"]),
    (HEAD + "seeds: [1, -1]\n", ["bad.yaml:4: seeds: seeds must be >= 0, got [1, -1]"]),
    (HEAD + "seeds: [1, 1]\n", ["bad.yaml:4: seeds: seeds must be distinct, got [1, 1]"]),
    (HEAD + "seeds: three\n", ["bad.yaml:4: seeds: must be a count (seeds: 3) or a list of seeds ([0, 1, 2]), got 'three'"]),
    (HEAD + "resources: {cpus: 0}\n", ["bad.yaml:4: resources.cpus: Input should be greater than 0, got 0"]),
    (HEAD + "resources: {gpus: 1.5}\n", ["bad.yaml:4: resources.gpus: more than one GPU must be a whole number, got gpus=1.5"]),
    (HEAD + "retries: many\n", ["bad.yaml:4: retries: Input should be a valid integer, unable to parse string as an integer, got 'many'"]),
    (HEAD + "search: {algorithm: grid, samples: 4}\n",
     ["bad.yaml:4: search: samples is for random and optuna searches; a grid runs every cell (repeat it with seeds instead)"]),
    (HEAD + "search: {algorithm: random}\n", ["bad.yaml:4: search: algorithm 'random' needs samples: N"]),
    ("name: t\ntrainer: nope\nmetric: {name: loss, mode: min}\n",
     ["bad.yaml:2: trainer: unknown trainer 'nope'; registered trainers: command, mbpa, sleep, snap; "
      "or a module path (mylab.logreg) or a file beside the sweep file (./logreg.py)"]),
    ("name: t\ntrainer: sleep\nmetric: {name: los, mode: min}\n",
     ["bad.yaml:3: metric.name: trainer 'sleep' does not report 'los'; it reports: loss, score, extra/*"]),
    ("name: t\ntrainer: sleep\nmetric: {name: loss, mode: minimum}\n",
     ["bad.yaml:3: metric.mode: Input should be 'min' or 'max', got 'minimum'"]),
    ("trainer: sleep\nmetric: {name: loss, mode: min}\n", ["bad.yaml:1: name: required key is missing"]),
    (HEAD + "config: {reprts: 2}\n",
     ["bad.yaml:4: config.reprts: unknown option of trainers.sleep.Config (did you mean 'reports'?)"]),
    (HEAD + "config: {reports: two}\n", ["bad.yaml:4: config.reports: must be an integer, got 'two'"]),
    (HEAD + "config: {reports: 0}\n", ["bad.yaml:4: config: reports must be >= 1, got reports=0"]),
    (HEAD + "config: {seed: 3}\n", ["bad.yaml:4: config.seed: the seed is set per cell by `seeds`, not in config"]),
    (HEAD + "parameters:\n  xx: {grid: [1]}\n", ["bad.yaml:5: parameters.xx: not an option of trainer 'sleep' (did you mean 'x'?)"]),
    (HEAD + "parameters:\n  reports: {grid: [1, 0]}\n",
     ["bad.yaml:5: parameters.reports: reports must be >= 1, got reports=0 (in the cell with reports=0)"]),
    (HEAD + "parameters:\n  reports: {grid: [1, 2.5]}\n", ["bad.yaml:5: parameters.reports: must be an integer, got 2.5"]),
    (HEAD + "config: {x: 1.0}\nparameters:\n  x: {grid: [1]}\n",
     ["bad.yaml:6: parameters.x: 'x' is both fixed under config and swept; keep one"]),
    (HEAD + "variants:\n  - {x: 1.0, sleep: [1]}\n",
     ["bad.yaml:5: variants.0.sleep: must be a scalar or a mapping with exactly one key: one of grid, pow10, range, choice, uniform, loguniform, randint"]),
    (HEAD + "parameters:\n  x: {grid: [1]}\nexclude:\n  - {y: 1}\n", ["bad.yaml:7: exclude.0.y: exclude names a parameter that is not swept"]),
    (HEAD + "evil: !!python/object/apply:os.system [echo hacked]\n",
     ["bad.yaml:4: evil: tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed (only plain YAML data: mappings, lists, strings, numbers, booleans, null)",
      "bad.yaml:4: evil: unknown key (known keys: name, description, trainer, config, parameters, variants, exclude, seeds, metric, search, scheduler, resources, max_concurrent, retries, bundle, checkpoint, selection, claims, requirements)"]),
    (HEAD + "parameters:\n  x: {pow10: [-1]}\nsearch: {algorithm: optuna, samples: 3}\nseeds: 2\n",
     ["bad.yaml:7: seeds: optuna tunes one seed at a time: give seeds: 1 (or a one-seed list), then rerun the best configurations with more seeds as a grid"]),
    # every problem at once (issue 22): a type error does not hide a broken invariant, a bad
    # mode does not hide a metric typo, a missing metric does not hide an unknown trainer
    (HEAD + "config: {reports: 4.5, sleep: -1}\n",
     ["bad.yaml:4: config: sleep must be >= 0, got sleep=-1.0",
      "bad.yaml:4: config.reports: must be an integer, got 4.5"]),
    ("name: t\ntrainer: sleep\nmetric: {name: losss, mode: minn}\n",
     ["bad.yaml:3: metric.mode: Input should be 'min' or 'max', got 'minn'",
      "bad.yaml:3: metric.name: trainer 'sleep' does not report 'losss'; it reports: loss, score, extra/*"]),
    ("name: t\ntrainer: sleeep\n",
     ["bad.yaml:1: metric: required key is missing",
      "bad.yaml:2: trainer: unknown trainer 'sleeep' (did you mean 'sleep'?); registered trainers: command, "
      "mbpa, sleep, snap; or a module path (mylab.logreg) or a file beside the sweep file (./logreg.py)"]),
]


@pytest.mark.parametrize("text, expected", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_yaml_message(text: str, expected: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "bad.yaml")
    assert str(info.value).splitlines() == expected


def test_every_problem_in_one_pass() -> None:
    text = ("name: t\ntrainer: sleep\nconfig: {reprts: 2}\nparameters:\n  x: {grid: []}\n"
            "seeds: 0\nmetric: {name: loss, mode: best}\nsearch: {algorithm: grid, smaples: 3}\n")
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "s.yaml")
    lines = str(info.value).splitlines()
    assert [line.split(":")[1] for line in lines] == ["5", "6", "7", "8"]
    assert "did you mean 'samples'" in lines[-1]


def test_alias_bomb_is_refused_quickly_without_memory() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 9)}]")
    text = HEAD + "\n".join(lines) + "\n"  # 9**10 = 3.5 billion leaves if expanded
    # Expanding it would take billions of nodes; refusing it must cost next to no memory (a
    # bound on work, not on wall time, which depends on the machine's load).
    tracemalloc.start()
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "bomb.yaml")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "alias bomb" in str(info.value)
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_small_aliases_and_merge_keys_are_fine() -> None:
    text = HEAD + "config: &c {reports: 2}\nvariants:\n  - {x: 1.0}\n  - {x: 2.0}\n"
    spec = load_spec_text(text, "ok.yaml")
    assert spec.config == {"reports": 2}


def test_missing_file_is_a_spec_error(tmp_path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")


def test_good_spec_round_trip_and_defaults() -> None:
    spec = load_spec_text(HEAD + "parameters:\n  x: {pow10: [-2.5, -3]}\nseeds: [4, 7]\n", "ok.yaml")
    assert spec.seed_list == [4, 7]
    assert spec.search.algorithm == "grid" and spec.scheduler.type == "fifo"
    assert spec.parameters["x"].values() == [10 ** -2.5, 10 ** -3]
    assert spec.spec_hash() == load_spec_text(HEAD + "parameters:\n  x: {pow10: [-2.5, -3]}\nseeds: [4, 7]\n").spec_hash()


def test_json_schema_describes_the_format() -> None:
    schema = json_schema()
    assert set(schema["required"]) == {"name", "trainer", "metric"}
    assert schema["additionalProperties"] is False
    assert "parameters" in schema["properties"] and "scheduler" in schema["properties"]


@pytest.mark.parametrize("block, expected", [
    ("selection: {group_by: [x], select_by: lss, over: [reports]}\n",
     "t.yaml:7: selection.select_by: trainer 'sleep' does not report 'lss'; it reports: loss, score, extra/*"),
    ("selection: {group_by: [xx], select_by: loss, over: [reports]}\n",
     "t.yaml:7: selection.group_by.0: 'xx' is not a swept parameter (did you mean 'x'?)"),
    ("claims:\n  - {id: c, text: t, kind: less, metric: score, left: {x: 0.0}, right: {rports: 2}}\n",
     "t.yaml:8: claims.0.right.rports: 'rports' is not a swept parameter (did you mean 'reports'?)"),
])
def test_selection_and_claims_name_swept_parameters_and_reported_metrics(block, expected) -> None:
    text = HEAD + "parameters:\n  x: {grid: [0.0, 1.0]}\n  reports: {grid: [1, 2]}\n" + block
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "t.yaml")
    assert str(info.value).splitlines() == [expected]
