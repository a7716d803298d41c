"""Run a trainer standalone: ``python -m hpsweep.trainer TRAINER key=value ... [--out DIR]`` (any
trainer; ``hpsweep/trainer/__main__.py``), or ``python -m trainers.NAME ...`` for a built-in.

No Ray, no MLflow: a :class:`~hpsweep.trainer.run.LocalRun` writes ``metrics.jsonl`` and
``checkpoint.pt`` under ``--out``; running the same command again resumes from it. Outputs
(``run.output``) go to ``--outputs`` (default ``OUT/outputs``): give two runs the same one to
read what the first wrote as ``output:NAME``. Relative data paths resolve under the current
directory or the data root and may not climb out of them (checked before anything runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hpsweep.trainer.config import OutputName, build_config, config_fields, parse_text, path_fields
from hpsweep.trainer.data import check_location, check_output_name, standalone_bases
from hpsweep.trainer.run import LocalRun

__all__ = ["main"]


def main(name: str, config_cls: type, train: Callable[[Any, Any], None], argv: Sequence[str] | None = None,
         prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or f"python -m trainers.{name}",
        description=f"Run the {name} trainer without Ray or MLflow.",
        epilog="options (key=value): " + ", ".join(
            f"{f.name}={f.default!r}" for f in dataclasses.fields(config_cls)),
    )
    parser.add_argument("options", nargs="*", metavar="key=value")
    parser.add_argument("--out", default=None, help="output directory (default runs/NAME-TIME)")
    parser.add_argument("--outputs", default=None,
                        help="where run.output files go and output:NAME reads from (default OUT/outputs)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_intermixed_args(argv)
    values: dict[str, Any] = {}
    for item in args.options:
        key, sep, text = item.partition("=")
        if not sep:
            print(f"error: {item!r}: expected key=value; options: {', '.join(config_fields(config_cls))}",
                  file=sys.stderr)
            return 2
        values[key] = parse_text(text)
    config, problems = build_config(config_cls, values)
    if problems:
        for p in problems:
            print(f"error: {p.field or name}: {p.message}", file=sys.stderr)
        return 2
    bases = standalone_bases()
    for field, kind in path_fields(config_cls).items():
        value = getattr(config, field)
        if isinstance(value, str):
            value = value.replace("{seed}", str(getattr(config, "seed", 0)))
            problem = (check_output_name(value) if kind is OutputName
                       else check_location(value, bases, must_exist=False))
            if problem:
                problems.append(f"error: {field}: {problem}")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    stem = Path(name.rstrip("/")).stem or "trainer"
    out = args.out or f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = LocalRun(out, echo=True, outputs_dir=args.outputs, bases=bases)
    print(f"{name}: {config}\nwriting to {out}", flush=True)
    try:
        train(config, run)
    except (ValueError, FileNotFoundError) as exc:  # bad data paths, options the data refutes
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        run.close()
    return 0
