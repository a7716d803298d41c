"""The checks of a sweep that need its trainer: the trainer's options and metrics, the data paths
and output names its Config marks, every distinct config through the trainer's own Config, and the
selection protocol's and claims' names. The trainer is imported without its numeric code."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpsweep.spec.problems import Problem
from hpsweep.spec.yamlload import LoadedYaml

if TYPE_CHECKING:
    from hpsweep.spec.model import SweepSpec

__all__ = ["check_against_trainer", "check_raw_against_trainer"]


def check_raw_against_trainer(data: dict, loaded: LoadedYaml, base_dir=None) -> list[Problem]:
    """What can be checked against the trainer when the file itself did not validate (a bad
    ``mode``, a missing ``metric``): that the trainer exists and reports the metric, so that
    these problems come with the others instead of after they are fixed."""
    from hpsweep.trainer.registry import UnknownTrainer, load_config

    trainer = data.get("trainer")
    if not isinstance(trainer, str):
        return []
    try:
        info = load_config(trainer, base_dir=Path(base_dir) if base_dir is not None else None)
    except UnknownTrainer as exc:
        return [Problem(loaded.line_of(("trainer",)), "trainer", str(exc))]
    except Exception:   # the trainer's own import problems are reported once the file validates
        return []
    metric = data.get("metric")
    name = metric.get("name") if isinstance(metric, dict) else None
    if isinstance(name, str) and not info.reports(name):
        return [Problem(loaded.line_of(("metric", "name")), "metric.name",
                        f"trainer {trainer!r} does not report {name!r}; it reports: {', '.join(info.metrics)}")]
    return []


def check_against_trainer(spec: SweepSpec, loaded: LoadedYaml) -> list[Problem]:
    """Checks that need the trainer: its options, its metrics, every distinct config once
    (through the trainer's own Config, imported without its numeric code)."""
    from hpsweep.trainer.config import config_fields
    from hpsweep.trainer.registry import TrainerError

    problems: list[Problem] = []

    def add(path: tuple, message: str) -> None:
        problems.append(Problem(loaded.line_of(path), ".".join(map(str, path)), message))

    try:
        info = spec.trainer_info()
    except TrainerError as exc:
        add(("trainer",), str(exc))
        return problems
    own: list[Problem] = []   # the trainer's own checks: reported with, not instead of, the rest
    if info.check is not None:
        for field, message in info.check(spec.trainer_config(), [Path(b) for b in spec.data_bases()]):
            where = ("config", field) if field in spec.config else ("config",)
            own.append(Problem(loaded.line_of(where), ".".join(map(str, where)), message))
    fields = config_fields(info.Config)
    for key in spec.config:
        if key == "seed":
            add(("config", key), "the seed is set per cell by `seeds`, not in config")
    swept: dict[str, tuple] = {name: ("parameters", name) for name in spec.parameters}
    for i, variant in enumerate(spec.variants):
        for name in variant:
            swept.setdefault(name, ("variants", i, name))
            if name in spec.parameters:
                add(("variants", i, name), f"{name!r} is already swept under parameters")
    for name, where in swept.items():
        if name == "seed":
            add(where, "seeds are their own axis: use `seeds`, not a parameter")
        elif name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            add(where, f"not an option of trainer {spec.trainer!r}{hint}")
        if name in spec.config:
            add(where, f"{name!r} is both fixed under config and swept; keep one")
    for i, rule in enumerate(spec.exclude):
        for name in rule:
            if name not in swept:
                add(("exclude", i, name), "exclude names a parameter that is not swept")
    if not info.reports(spec.metric.name):
        add(("metric", "name"), f"trainer {spec.trainer!r} does not report {spec.metric.name!r}; "
                                f"it reports: {', '.join(info.metrics)}")
    _check_protocol(spec, info, set(swept), add)
    sampled = [n for n, d in _all_domains(spec) if d.sampled]
    if spec.search.algorithm == "grid" and sampled:
        for name in dict.fromkeys(sampled):
            add(swept[name], "a sampled domain needs search.algorithm random or optuna "
                             "(or use grid / pow10 / range values)")
    if spec.search.algorithm == "optuna":
        if len(spec.seed_list) != 1:
            add(("seeds",), "optuna tunes one seed at a time: give seeds: 1 (or a one-seed list), "
                            "then rerun the best configurations with more seeds as a grid")
        if spec.variants or spec.exclude:
            add(("variants",) if spec.variants else ("exclude",),
                "variants and exclude describe grids; optuna searches one space")
    paths = _check_paths(spec, info.Config, swept, loaded)
    found = problems + paths if problems else _check_configs(spec, info, swept, loaded) + paths
    said = {p.message for p in found}
    return found + [p for p in own if p.message not in said]


def _check_paths(spec: SweepSpec, config_cls: type, swept: dict[str, tuple], loaded: LoadedYaml) -> list[Problem]:
    """The fields the trainer's Config marks as data locations stay where they may (absolute,
    s3://, or under the sweep file's directory or the data root) and the output names are names,
    for the fixed value and every swept one (``{seed}`` filled with each seed)."""
    from hpsweep.trainer.config import OutputName, path_fields
    from hpsweep.trainer.data import check_location, check_output_name

    bases = [Path(b) for b in spec.data_bases()]
    problems: list[Problem] = []
    for name, kind in path_fields(config_cls).items():
        places: list[tuple[tuple, Any]] = []
        if name in spec.config:
            places.append((("config", name), spec.config[name]))
        if name in swept:
            domains = [spec.parameters[name]] if name in spec.parameters else []
            domains += [v[name] for v in spec.variants if name in v]
            for domain in domains:
                for value in domain.extremes() if domain.sampled else domain.values():
                    places.append((swept[name], value))
        seen: set[tuple] = set()
        for where, value in places:
            if not isinstance(value, str):
                continue  # the type check reports it
            for seed in spec.seed_list:
                text = value.replace("{seed}", str(seed))
                problem = (check_output_name(text) if kind is OutputName
                           else check_location(text, bases, must_exist=False))
                if problem and (where, problem) not in seen:
                    seen.add((where, problem))
                    problems.append(Problem(loaded.line_of(where), ".".join(map(str, where)), problem))
                if "{seed}" not in value:
                    break
    return problems


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _named(message: str, names) -> list[str]:
    """The names (of ``names``) that a message mentions as whole words, in ``names``' order."""
    words = set(_WORD.findall(message))
    return [n for n in names if n in words]


def _check_configs(spec: SweepSpec, info, swept: dict[str, tuple], loaded: LoadedYaml) -> list[Problem]:
    """Every distinct config once (:mod:`hpsweep.spec.points`), and the fixed options with each
    seed; each problem reported once, at the line of what causes it: a fixed option under
    ``config`` at its own line (not once per cell), a swept value at its parameter."""
    from hpsweep.spec.points import resolve
    from hpsweep.trainer.config import build_config

    problems: list[Problem] = []
    seen: set[tuple] = set()
    fixed = {k: v for k, v in spec.config.items() if k != "seed"}

    def add(path: tuple, message: str, line_path: tuple | None = None) -> None:
        if (path, message) not in seen:
            seen.add((path, message))
            problems.append(Problem(loaded.line_of(line_path or path), ".".join(map(str, path)), message))

    def add_fixed(part: str) -> None:
        named = _named(part, fixed)
        add(("config",), part, ("config", named[0]) if named else ("config",))

    # The fixed options with each seed: their types, and what a seed alone can break.
    bad_fixed: set[str] = set()
    for seed in spec.seed_list:
        _, fixed_problems = build_config(info.Config, {**fixed, "seed": seed})
        for p in fixed_problems:
            if p.field and p.field not in swept:
                bad_fixed.add(p.field)
                add(("seeds",) if p.field == "seed" else ("config", p.field), p.message)
            elif not p.field:
                for part in p.message.split("; "):
                    if "seed" in _named(part, ["seed"]) and not _named(part, swept):
                        add(("seeds",), part)
    # Every distinct config: a part of an invariant that names no swept value is the fixed
    # options' own (reported once at config); one that does is the cell's, at its parameter.
    resolved, failures = resolve(spec, info.Config)
    for values, config_problems in failures:
        for p in config_problems:
            if p.field in bad_fixed:
                continue
            if p.field in values:
                add(swept[p.field], p.message)
            elif p.field:
                add(("config", p.field), p.message)
            else:
                for part in p.message.split("; "):
                    named = _named(part, values)
                    if not named:
                        add_fixed(part)
                        continue
                    shown = ", ".join(f"{n}={values[n]!r}" for n in named)
                    add(swept[named[0]], f"{part} (in the cell with {shown})")
    if resolved is not None and not problems:
        spec._points = resolved  # plan() crosses these with the seeds; nothing validates twice
    return problems


def _check_protocol(spec: SweepSpec, info, swept: set[str], add) -> None:
    """The selection protocol and the claims name swept parameters and reported metrics; each
    problem goes to ``add``."""
    params = swept | {"seed"}

    def metric(path: tuple, name: str) -> None:
        if not info.reports(name):
            add(path, f"trainer {spec.trainer!r} does not report {name!r}; it reports: "
                      f"{', '.join(info.metrics)}")

    def param(path: tuple, name: str) -> None:
        if name not in params:
            close = difflib.get_close_matches(name, sorted(params), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            add(path, f"{name!r} is not a swept parameter{hint}")

    sel = spec.selection
    if sel is not None:
        metric(("selection", "select_by"), sel.select_by)
        for i, name in enumerate(sel.report):
            metric(("selection", "report", i), name)
        for key in ("group_by", "over"):
            for i, name in enumerate(getattr(sel, key)):
                param(("selection", key, i), name)
        for key in ("select_on", "report_on", "report_exclude"):
            for name in getattr(sel, key):
                param(("selection", key, name), name)
    for i, claim in enumerate(spec.claims):
        metric(("claims", i, "metric"), claim.metric)
        for j, name in enumerate(claim.pair_by):
            param(("claims", i, "pair_by", j), name)
        sides = [("left", claim.left), ("right", claim.right)] + \
            [(f"order.{k}", side) for k, side in enumerate(claim.order or [])]
        for where, side in sides:
            for name in side or {}:
                param(("claims", i, *where.split("."), name), name)


def _all_domains(spec: SweepSpec):
    yield from spec.parameters.items()
    for variant in spec.variants:
        yield from variant.items()
