"""The report's figures: matplotlib (Agg) drawn to PNG bytes.

Each function takes plain data (observations, histories) and returns ``(title, png_bytes)`` or
``None`` when the sweep has nothing to draw for it, so the report shows only what applies.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: reports are written from CLIs, CI and cluster jobs

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from hpsweep.fmt import fmt_param  # noqa: E402
from hpsweep.store.runs import ENDED  # noqa: E402
from hpsweep.views.stats import Obs, mean_std  # noqa: E402

__all__ = ["Figure", "curves", "sensitivity", "parallel_coordinates", "per_task", "heatmap",
           "band", "MAX_LINES"]

Figure = tuple[str, bytes]
MAX_LINES = 10


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def band(series: Sequence[Sequence[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over seeds at each step any seed reported (a seed missing a step is left
    out of that step, not filled in). Returns (steps, mean, std)."""
    by_step: dict[int, list[float]] = {}
    for s in series:
        for step, value in s:
            if math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    mean, std = _mean_std_arrays([by_step[k] for k in steps])
    return np.array(steps, dtype=float), mean, std


def _mean_std_arrays(samples: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`hpsweep.views.stats.mean_std` of each sample; an undefined std (one value) draws as a
    zero-width band."""
    pairs = [mean_std(list(v)) for v in samples]
    mean = np.array([m for m, _ in pairs], dtype=float)
    std = np.nan_to_num(np.array([s for _, s in pairs], dtype=float), nan=0.0)
    return mean, std


def curves(title: str, metric: str, groups: Sequence[tuple[str, Sequence[Sequence[tuple[int, float]]]]],
           ylabel: str | None = None) -> Figure | None:
    """One line per group (mean over its seeds) with a +-1 std band."""
    groups = [(label, [s for s in series if s]) for label, series in groups][:MAX_LINES]
    groups = [(label, series) for label, series in groups if series]
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn: list[tuple[str, np.ndarray, np.ndarray]] = []
    for i, (label, series) in enumerate(groups):
        steps, mean, std = band(series)
        # a line identical to one drawn already hides it: say so in the legend, and tell every
        # line apart by its marker and dash as well as its colour
        same = next((lab for lab, s, m in drawn if len(s) == len(steps) and np.array_equal(s, steps)
                     and np.allclose(m, mean, rtol=1e-12, atol=0.0, equal_nan=True)), None)
        note = f", identical to {same}" if same else ""
        line, = ax.plot(steps, mean, label=f"{label} (n={len(series)}{note})", lw=1.5,
                        marker=MARKERS[i % len(MARKERS)], markevery=max(1, len(steps) // 8), ms=4,
                        linestyle=DASHES[i % len(DASHES)])
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
        drawn.append((label, steps, mean))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel or metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return title, _png(fig)


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


MARKERS = ("o", "s", "^", "D", "v", "x", "P", "*")
DASHES = ("-", "--", "-.", ":")


def _axis_positions(values: Sequence[Any], log_scale: bool = False) -> tuple[dict, bool]:
    """Map parameter values to x positions: numbers on a (log) scale, the rest as categories.
    ``log_scale``: the parameter's domain is logarithmic (``pow10``, ``loguniform``): always a
    log axis; other positive numbers spanning two decades or more get one too."""
    distinct = sorted(set(values), key=lambda v: (str(type(v)), v))
    if _numeric(distinct) and len(distinct) > 1:
        log = min(distinct) > 0 and (log_scale or max(distinct) / min(distinct) >= 100)
        return {v: float(v) for v in distinct}, log
    return {v: float(i) for i, v in enumerate(distinct)}, False


def sensitivity(metric: str, obs: Sequence[Obs], params: Sequence[str],
                log_params: Sequence[str] = ()) -> Figure | None:
    """The final metric of every finished cell against each swept parameter (one panel each),
    with the mean at each value; ``log_params`` on log axes."""
    done = [o for o in obs if o.state in ENDED and metric in o.metrics]
    params = [p for p in params if len({_hashable(o.params.get(p)) for o in done}) > 1][:9]
    if not done or not params:
        return None
    cols = min(3, len(params))
    rows = math.ceil(len(params) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, p in zip(axes.flat, params, strict=False):
        vals = [_hashable(o.params.get(p)) for o in done]
        pos, log = _axis_positions(vals, p in log_params)
        x = np.array([pos[v] for v in vals])
        y = np.array([o.metrics[metric] for o in done])
        jitter = 0.0 if log or _numeric(list(pos)) else 0.08
        rng = np.random.default_rng(0)
        ax.scatter(x + rng.uniform(-jitter, jitter, len(x)), y, s=6, alpha=0.35)
        keys = sorted(pos, key=pos.get)
        means, _ = _mean_std_arrays([y[x == pos[k]].tolist() for k in keys])
        ax.plot([pos[k] for k in keys], means, "k-o", ms=3, lw=1)
        if log:
            ax.set_xscale("log")
        if not _numeric(list(pos)):
            ax.set_xticks([pos[k] for k in keys], [str(k) for k in keys], fontsize=7, rotation=30)
        ax.set_xlabel(p)
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(params):]:
        ax.axis("off")
    fig.suptitle(f"Sensitivity of {metric} to each swept parameter: every finished cell's final value, "
                 "and the mean at each value", fontsize=10)
    fig.tight_layout()
    return f"Sensitivity of {metric}", _png(fig)


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def parallel_coordinates(metric: str, configs: Sequence[tuple[dict, float]],
                         params: Sequence[str], mode: str, log_params: Sequence[str] = ()) -> Figure | None:
    """One line per configuration (mean over seeds) across the swept parameters, coloured by
    the metric; the best configurations are drawn on top."""
    configs = [(c, v) for c, v in configs if math.isfinite(v)]
    if len(params) < 3 or len(configs) < 2:
        return None
    axes_names = list(params) + [metric]
    cols = []
    labels = []   # per axis: [(y position, value)]
    for p in params:
        vals = [_hashable(c.get(p)) for c, _ in configs]
        pos, log = _axis_positions(vals, p in log_params)
        at = {v: (math.log10(x) if log else x) for v, x in pos.items()}
        lo, hi = min(at.values()), max(at.values())
        norm_at = {v: (x - lo) / (hi - lo) if hi > lo else 0.5 for v, x in at.items()}
        cols.append(np.array([norm_at[v] for v in vals]))
        labels.append(sorted(((y, v) for v, y in norm_at.items()), key=lambda t: t[0]))
    y = np.array([v for _, v in configs])
    lo, hi = y.min(), y.max()
    cols.append((y - lo) / (hi - lo) if hi > lo else np.full_like(y, 0.5))
    data = np.stack(cols, axis=1)
    order = np.argsort(-y if mode == "min" else y)  # best last, so drawn on top
    xs = np.arange(len(axes_names), dtype=float)
    segs = [np.column_stack([xs, data[i]]) for i in order]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(axes_names)), 4))
    norm = plt.Normalize(lo, hi)
    cmap = plt.get_cmap("viridis_r" if mode == "min" else "viridis")
    lc = LineCollection(segs, colors=cmap(norm(y[order])), linewidths=0.8,
                        alpha=0.5 if len(segs) > 200 else 0.8)
    ax.add_collection(lc)
    ax.set_xlim(-0.2, len(axes_names) - 0.8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(xs, axes_names, fontsize=8, rotation=20)
    ax.set_yticks([])
    for x in xs:
        ax.axvline(x, color="k", lw=0.5)
    for x, lab in zip(xs, labels, strict=False):
        for y, v in (lab if len(lab) <= 8 else [lab[0], lab[-1]]):
            text = fmt_param(v)
            ax.text(x + 0.03, y, text, fontsize=6, va="center",
                    bbox={"facecolor": "white", "alpha": 0.6, "lw": 0, "pad": 0.5})
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric)
    ax.set_title(f"Parallel coordinates: {len(configs)} configurations, mean {metric} over seeds",
                 fontsize=10)
    return "Parallel coordinates", _png(fig)


def per_task(title: str, groups: Sequence[tuple[str, Mapping[int, Sequence[float]]]],
             ylabel: str) -> Figure | None:
    """Per-task final accuracy (mean +- std over seeds), one line per method."""
    groups = [(label, per) for label, per in groups if per][:MAX_LINES]
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, per in groups:
        tasks = sorted(per)
        mean, std = _mean_std_arrays([per[t] for t in tasks])
        ax.errorbar(tasks, mean, yerr=std, marker="o", ms=3, capsize=2,
                    label=f"{label} (mean {mean.mean():.3g})")
    ax.set_xlabel("task")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return title, _png(fig)


def heatmap(title: str, xname: str, yname: str, cells: Mapping[tuple[Any, Any], float],
            metric: str, mode: str) -> Figure | None:
    """``metric`` over a 2-D grid of two parameters (missing combinations left blank)."""
    if len(cells) < 2:
        return None
    xs = sorted({k[0] for k in cells})
    ys = sorted({k[1] for k in cells})
    grid = np.full((len(ys), len(xs)), np.nan)
    for (x, y), v in cells.items():
        grid[ys.index(y), xs.index(x)] = v
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2.5, 0.8 * len(ys) + 1.8))
    im = ax.imshow(grid, cmap="viridis_r" if mode == "min" else "viridis", origin="lower",
                   aspect="auto")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ys)), [str(y) for y in ys])
    ax.set_xlabel(xname)
    ax.set_ylabel(yname)
    for (i, j), v in np.ndenumerate(grid):
        if math.isfinite(v):
            ax.text(j, i, f"{v:.4g}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(title, fontsize=10)
    return title, _png(fig)
