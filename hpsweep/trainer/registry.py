"""Finding trainers: what a sweep's ``trainer:`` names, and the checks of its contract.

A trainer is any module with a frozen dataclass ``Config`` (its fields are the options; ``seed:
int`` among them), ``METRICS`` (the metric names ``train`` may report, ``fnmatch`` patterns such
as ``"acc/task_*"`` allowed) and ``train(config, run)``. It imports nothing from hpsweep (``run``
is duck-typed). ``trainer:`` names it one of four ways, tried in this order:

- a file or a package directory, relative to the sweep file (``./logreg.py``, ``./mylab/``,
  anything with a ``/`` or ending in ``.py``): imported as ``python FILE`` would, its directory
  first on ``sys.path``;
- a name an installed distribution registers in the entry-point group ``hpsweep.trainers``
  (``snap = "trainers.snap"``; the built-ins are registered that way in ``pyproject.toml``);
- an importable module (``mylab.logreg``: an installed package, ``PYTHONPATH``).

Validating a sweep imports the module and reads ``Config`` and ``METRICS`` (from its ``config``
submodule when it has one and keeps them there); ``train`` is checked where the module defines
it, and only looked up when a trial runs where the module exports it lazily (the built-ins'
``lazy_exports``), so a module that keeps its numeric stack in a ``training`` submodule keeps
it out of ``hpsweep validate``.

A trainer whose options or metrics depend on the sweep (the command trainer: any name is a
value for its program, and its metrics are its patterns' names) adds, beside its Config:

- ``config_class(config) -> type``: the Config for a sweep or cell whose config has these keys;
- ``metrics_of(config) -> tuple[str, ...]``: the metrics a sweep with this fixed config reports;
- ``problems(config, bases) -> [(field, message)]``: checks that need the sweep file's directory
  (``bases``: where relative paths resolve), run by ``hpsweep validate``.

:func:`load_config` and :func:`load_trainer` given the sweep's (or the cell's) config apply them.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["GROUP", "ConfigInfo", "TrainerInfo", "TrainerRef", "TrainerError", "UnknownTrainer",
           "resolve", "load_config", "load_trainer", "lazy_exports", "entry_points", "BUILTIN", "base_here",
           "source_of"]

#: the entry-point group a distribution registers its trainers in: ``NAME = "package.module"``
GROUP = "hpsweep.trainers"

#: hpsweep's own entry points (``pyproject.toml``), for an install whose metadata predates them
#: (an editable install not reinstalled since): tests/unit/test_registry.py keeps the two equal
BUILTIN = {"snap": "trainers.snap", "mbpa": "trainers.mbpa", "sleep": "trainers.sleep",
           "command": "hpsweep.trainer.command"}

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class TrainerError(ValueError):
    """What is wrong with a sweep's ``trainer:``: the message names the user's file and line
    where there is one."""


class UnknownTrainer(TrainerError):
    """A ``trainer:`` that names no file, entry point or module."""


@dataclasses.dataclass(frozen=True)
class TrainerRef:
    """Where a ``trainer:`` points: the module to import and the ``sys.path`` entry it needs."""
    text: str                 # as the sweep file says it
    kind: str                 # "file" | "package" | "entry point" | "module"
    module: str               # the importable name
    path: str | None = None   # a directory put first on sys.path (file and package trainers)
    source: str | None = None  # the file or the package directory (file and package trainers)


@dataclasses.dataclass(frozen=True)
class ConfigInfo:
    """What validating a sweep needs of a trainer: its Config and its metrics."""
    name: str
    module: str
    Config: type
    metrics: tuple[str, ...]
    ref: TrainerRef | None = None
    #: ``problems(config, bases)`` of the trainer (see the module docstring), or None
    check: Callable[[Mapping[str, Any], list], list] | None = None
    #: the module that holds Config and METRICS (the trainer's, or its ``config`` submodule)
    holder: str | None = None

    def reports(self, metric: str) -> bool:
        """True when ``metric`` is one of the names (or patterns) the trainer declares."""
        return any(fnmatch.fnmatchcase(metric, pattern) for pattern in self.metrics)

    def source_dir(self) -> Path | None:
        """The directory of the trainer's source (for its git commit), or None."""
        module = sys.modules.get(self.module)
        where = getattr(module, "__file__", None)
        return Path(where).resolve().parent if where else None


@dataclasses.dataclass(frozen=True)
class TrainerInfo(ConfigInfo):
    """A trainer ready to run: its config and its training loop."""
    train: Callable[[Any, Any], None] = None  # type: ignore[assignment]


# --- what a `trainer:` names ------------------------------------------------------------------

def entry_points() -> dict[str, str]:
    """Trainer name -> module, from the installed distributions' ``hpsweep.trainers`` entry
    points (hpsweep's own from :data:`BUILTIN` when its installed metadata has none)."""
    from importlib import metadata

    found: dict[str, str] = {}
    own = False
    for ep in metadata.entry_points(group=GROUP):
        found.setdefault(ep.name, ep.value)
        own = own or (ep.dist is not None and ep.dist.name == "hpsweep")
    if not own:
        for name, module in BUILTIN.items():
            found.setdefault(name, module)
    return found


def _is_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.endswith(".py") or text.startswith(".")


def _beside(base: Path) -> list[str]:
    """The Python files and package directories beside the sweep file, as ``trainer:`` names them."""
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    out = []
    for p in entries:
        if p.name.startswith((".", "_")):
            continue
        if p.is_file() and p.suffix == ".py":
            out.append(f"./{p.name}")
        elif p.is_dir() and (p / "__init__.py").is_file():
            out.append(f"./{p.name}/")
    return out


def _unknown(text: str, base: Path, why: str) -> UnknownTrainer:
    names = sorted(entry_points())
    files = _beside(base)
    close = difflib.get_close_matches(text, names + files, n=1, cutoff=0.6)
    if not close and not _is_path(text):  # `logreg` for ./logreg.py
        close = difflib.get_close_matches(f"./{text}.py", files, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UnknownTrainer(f"{why}{hint}; registered trainers: {', '.join(names)}; or a module path "
                          "(mylab.logreg) or a file beside the sweep file (./logreg.py)")


def resolve(text: str, base_dir: str | Path | None = None) -> TrainerRef:
    """Where ``text`` (a sweep's ``trainer:``) points; relative paths from ``base_dir`` (the
    sweep file's directory, default the current one). Raises :class:`UnknownTrainer`."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    text = text.strip()
    if not text:
        raise UnknownTrainer("empty trainer name")
    if _is_path(text):
        target = (base / text).absolute()
        if target.is_file():
            if target.suffix != ".py":
                raise TrainerError(f"{text}: a file trainer is a Python file (.py); for any other "
                                   "program use `trainer: command`")
            return TrainerRef(text, "file", target.stem, str(target.parent), str(target))
        if target.is_dir():
            if not (target / "__init__.py").is_file():
                raise TrainerError(f"{text}: a package directory needs an __init__.py (that defines or "
                                   "imports Config, METRICS and train)")
            return TrainerRef(text, "package", target.name, str(target.parent), str(target))
        raise _unknown(text, base, f"{text}: no such file or directory (relative to {base})")
    registered = entry_points()
    if text in registered:
        value = registered[text]
        if ":" in value:
            raise TrainerError(f"entry point {text} = {value!r} in group {GROUP}: name a module "
                               f"({value.split(':')[0]!r}), not an object in it")
        return TrainerRef(text, "entry point", value)
    if _MODULE.match(text) and text.split(".")[0] not in _FROM_FILE:
        # as the sweep's process finds it: not through the directories of file trainers that an
        # earlier sweep of the same `validate` put on sys.path
        added = {str(Path(source).parent) for source in _FROM_FILE.values()}
        kept = sys.path[:]
        sys.path[:] = [p for p in kept if p not in added]
        try:
            found = importlib.util.find_spec(text)
        except (ImportError, ValueError):
            found = None
        except Exception as exc:  # a parent package that raises on import
            raise TrainerError(_import_failure(text, exc, None)) from None
        finally:
            sys.path[:] = kept
        if found is not None:
            return TrainerRef(text, "module", text)
    raise _unknown(text, base, f"unknown trainer {text!r}")


# --- importing it ------------------------------------------------------------------------------

def _import_failure(module: str, exc: BaseException, source: str | None) -> str:
    """One line: the user's file and line, and the exception (no traceback)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}: {type(exc).__name__}: {exc.msg} (importing {module})"
    frames = traceback.extract_tb(exc.__traceback__)
    root = Path(source).resolve() if source else None
    mine = [f for f in frames if "importlib" not in f.filename and not f.filename.startswith("<")]
    if root is not None:
        inside = [f for f in mine if Path(f.filename).resolve().is_relative_to(root)]
        mine = inside or mine
    where = f"{mine[-1].filename}:{mine[-1].lineno}: " if mine else ""
    message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return f"{where}{message} (importing {module})"


#: module name -> the file or package directory a file or package trainer was imported from
_FROM_FILE: dict[str, str] = {}


def _make_room(ref: TrainerRef) -> None:
    """Put the trainer's directory first on ``sys.path``; a module of the same name imported
    earlier from another trainer's file (two sweeps in one ``validate``) is set aside."""
    taken = sys.modules.get(ref.module)
    where = getattr(taken, "__file__", None) or ""
    mine = Path(ref.source).resolve()
    if taken is not None and not Path(where).resolve().is_relative_to(mine):
        earlier = _FROM_FILE.get(ref.module)
        if earlier is None:
            raise TrainerError(f"{ref.text}: the module name {ref.module!r} is already taken by "
                               f"{where or 'a built-in module'}; rename the file or directory")
        for name in [m for m in sys.modules if m == ref.module or m.startswith(ref.module + ".")]:
            del sys.modules[name]
        with_earlier = str(Path(earlier).parent)
        if with_earlier in sys.path and with_earlier != ref.path:
            sys.path.remove(with_earlier)
    if ref.path in sys.path:
        sys.path.remove(ref.path)
    sys.path.insert(0, ref.path)
    importlib.invalidate_caches()


def _import(ref: TrainerRef, name: str | None = None):
    """Import ``name`` (default the trainer's module) as the driver and every worker do."""
    name = name or ref.module
    if ref.path is not None and name == ref.module:
        _make_room(ref)
    try:
        module = importlib.import_module(name)
    except TrainerError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name == name and ref.kind == "entry point":
            raise TrainerError(f"trainer {ref.text!r}: its entry point names module {name!r}, which "
                               f"is not installed here") from None
        raise TrainerError(_import_failure(name, exc, ref.source)) from None
    except (Exception, SystemExit) as exc:
        raise TrainerError(_import_failure(name, exc, ref.source)) from None
    if ref.path is not None and name == ref.module:
        where = Path(getattr(module, "__file__", "") or "").resolve()
        if not where.is_relative_to(Path(ref.source).resolve()):
            raise TrainerError(f"{ref.text}: the module name {ref.module!r} is already taken by {where}; "
                               "rename the file or directory")
        _FROM_FILE[ref.module] = ref.source
    return module


def _has_submodule(module, name: str) -> bool:
    if not hasattr(module, "__path__"):
        return False
    try:
        return importlib.util.find_spec(f"{module.__name__}.{name}") is not None
    except (ImportError, ValueError):
        return False


def _contract(ref: TrainerRef, module) -> tuple[type, tuple[str, ...], Any]:
    """Config, METRICS and train (where the module defines it), checked; every problem in one
    TrainerError."""
    holder = module   # a `config` submodule holds them (and the hooks) where there is one
    if _has_submodule(module, "config"):
        config_module = _import(ref, f"{module.__name__}.config")
        if hasattr(config_module, "Config") or not hasattr(module, "Config"):
            holder = config_module
    problems = []
    config_cls = getattr(holder, "Config", None)
    where = getattr(holder, "__file__", None) or ref.module
    if config_cls is None:
        problems.append("no Config: define a frozen dataclass `Config` whose fields are the options")
    elif not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        problems.append("Config is not a dataclass: decorate it with @dataclasses.dataclass(frozen=True)")
    elif not config_cls.__dataclass_params__.frozen:
        problems.append("Config is not frozen: use @dataclasses.dataclass(frozen=True) (a cell's "
                        "options never change while it trains)")
    elif "seed" not in {f.name for f in dataclasses.fields(config_cls)}:
        problems.append("Config has no `seed` field: add `seed: int = 0` (each cell's seed arrives there)")
    metrics = getattr(holder, "METRICS", None)
    if metrics is None:
        problems.append("no METRICS: a tuple of the metric names train reports, e.g. "
                        "METRICS = (\"loss\", \"acc\")")
    elif isinstance(metrics, str) or not all(isinstance(m, str) for m in metrics):
        problems.append(f"METRICS must be a tuple of metric names (strings), got {metrics!r}")
    if "train" in vars(module):
        problem = _train_problem(vars(module)["train"])
        if problem:
            problems.append(problem)
    elif not _lazy_train(module):
        problems.append("no train function: define `def train(config, run):` (or a `training` "
                        "submodule that does)")
    if problems:
        raise TrainerError(f"{where}: trainer {ref.text!r}: " + "; ".join(problems))
    return config_cls, tuple(metrics), holder


def _train_problem(train) -> str | None:
    if not callable(train):
        return "train is not a function; define `def train(config, run):`"
    try:
        inspect.signature(train).bind(object(), object())
    except TypeError:
        code = getattr(train, "__code__", None)
        line = f" (line {code.co_firstlineno})" if code is not None else ""
        return (f"train{inspect.signature(train)}{line} cannot be called as train(config, run); "
                "define `def train(config, run):`")
    except ValueError:  # no signature (a builtin): trust it
        pass
    return None


def _lazy_train(module) -> bool:
    """Whether the module exports ``train`` without defining it yet (``lazy_exports``, or a
    ``training`` submodule): looked up when a trial runs."""
    exports = getattr(getattr(module, "__getattr__", None), "exports", None)
    if exports and "train" in exports:
        return True
    return _has_submodule(module, "training")


@functools.lru_cache(maxsize=64)
def _load_config(text: str, base: str | None) -> ConfigInfo:
    ref = resolve(text, base)
    module = _import(ref)
    config_cls, metrics, holder = _contract(ref, module)
    return ConfigInfo(name=text, module=module.__name__, Config=config_cls, metrics=metrics, ref=ref,
                      check=getattr(holder, "problems", None), holder=holder.__name__)


def load_config(text: str, config: Mapping[str, Any] | None = None,
                base_dir: str | Path | None = None) -> ConfigInfo:
    """A trainer's Config and METRICS (importing its numeric stack only where the module
    itself does), for a sweep's or a cell's ``config`` through the hooks above when given;
    relative paths from ``base_dir`` (the sweep file's directory). Raises
    :class:`TrainerError` naming what is wrong."""
    info = _load_config(text, str(Path(base_dir).absolute()) if base_dir is not None else None)
    if config is None:
        return info
    holder = sys.modules[info.holder]
    config_cls, metrics = info.Config, info.metrics
    if hasattr(holder, "config_class"):
        config_cls = holder.config_class(config)
    if hasattr(holder, "metrics_of"):
        metrics = tuple(holder.metrics_of(config))
    return dataclasses.replace(info, Config=config_cls, metrics=metrics)


def load_trainer(text: str, config: Mapping[str, Any] | None = None,
                 base_dir: str | Path | None = None) -> TrainerInfo:
    """The trainer ready to run (its training loop imported too)."""
    info = load_config(text, config, base_dir)
    module = sys.modules[info.module]
    # the training code's own import errors go up as they are (a trial records them, with the
    # trainer's frames, in the cell's run; ImportError is not retried)
    train = getattr(module, "train", None)
    if train is None and _has_submodule(module, "training"):
        train = getattr(importlib.import_module(f"{info.module}.training"), "train", None)
    problem = "no train function" if train is None else _train_problem(train)
    if problem:
        raise TrainerError(f"{getattr(module, '__file__', None) or info.module}: trainer {text!r}: {problem}")
    return TrainerInfo(name=text, module=info.module, Config=info.Config, metrics=info.metrics,
                       ref=info.ref, check=info.check, holder=info.holder, train=train)


def base_here(where: tuple[str, str | None] | None) -> str | None:
    """The sweep file's directory on this node, from ``where`` (the driver's absolute path, and
    the same relative to its working directory when inside it): in a submitted job, the node's
    own copy of the job's working directory (this process's working directory); elsewhere the
    absolute path where it exists here, else the same relative to this process's working directory."""
    from hpsweep.trainer.data import SHIPPED_FROM

    if not where:
        return None
    absolute, relative = where
    if relative is not None and (os.environ.get(SHIPPED_FROM) or not os.path.isdir(absolute)):
        return os.path.join(os.getcwd(), relative)
    return absolute


def source_of(text: str, base_dir: str | None) -> str | None:
    """The directory of a trainer's source (for the frames of its errors), or None."""
    try:
        found = load_config(text, base_dir=base_dir).source_dir()
    except Exception:
        return None
    return str(found) if found else None


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` for a trainer package: ``exports`` maps a name to the submodule
    that defines it, imported on first access (PEP 562)."""
    def __getattr__(attr: str):
        if attr not in exports:
            raise AttributeError(f"module {package!r} has no attribute {attr!r}")
        return getattr(importlib.import_module(f"{package}.{exports[attr]}"), attr)
    __getattr__.exports = dict(exports)
    return __getattr__
