"""Helpers for the report tests and bench/report.py: log a sweep's runs to MLflow directly,
following the tracking conventions (see hpsweep/store/mlflow.py), with statuses chosen by the test."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser

__all__ = ["SLEEP_SPEC", "CollectRun", "run_sleep", "log_sweep"]

#: a small real sweep of the `sleep` trainer (its loss is a known function of x, step, seed)
SLEEP_SPEC = """
name: {name}
trainer: sleep
config: {{sleep: 0.0}}
parameters:
  x: {{grid: [-1.0, 0.0, 0.5, 2.0]}}
  reports: {{grid: [3, 6]}}
seeds: 3
metric: {{name: loss, mode: min}}
selection:
  group_by: [x]
  select_by: loss
  over: [reports]
  report: [loss, score]
claims:
  - {{id: zero-beats-half, text: "x=0 reaches a lower loss than x=0.5", kind: less,
      metric: loss, left: {{x: 0.0}}, right: {{x: 0.5}}}}
  - {{id: zero-above-half, text: "x=0 reaches a higher loss than x=0.5 (false)", kind: greater,
      metric: loss, left: {{x: 0.0}}, right: {{x: 0.5}}}}
  - {{id: order, text: "loss grows with |x|", kind: order, metric: loss,
      order: [{{x: 0.0}}, {{x: 0.5}}, {{x: -1.0}}, {{x: 2.0}}]}}
"""


class CollectRun:
    """A trainer Run that keeps what it is told in memory."""

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self._ckpt = None

    def report(self, step: int, **metrics: float) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, float(v)))

    def save_checkpoint(self, state: dict) -> None:
        self._ckpt = state

    def load_checkpoint(self):
        return None

    def log_artifact(self, path: str) -> None:
        pass

    def data_path(self, uri: str):
        raise NotImplementedError("the sleep trainer reads no data")

    def output(self, name: str):
        raise NotImplementedError("the sleep trainer writes no outputs")


def run_sleep(config: Mapping) -> dict[str, list[tuple[int, float]]]:
    """Run the real sleep trainer on ``config`` (a resolved config dict) and collect its metrics."""
    from hpsweep.trainer.config import build_config
    from trainers.sleep import Config, train

    cfg, problems = build_config(Config, dict(config))
    if problems:
        raise ValueError(problems)
    run = CollectRun()
    train(cfg, run)
    return run.metrics


def log_sweep(
    client,
    sweep_name: str,
    cells: Iterable,
    metrics_of: Callable[[object], Mapping[str, Sequence[tuple[int, float]]]],
    status_of: Callable[[object], str | None] = lambda c: "FINISHED",
    threads: int = 4,
) -> tuple[str, str]:
    """Log one parent run and a child run per cell (``status_of`` None: the cell never ran).
    Returns (experiment id, parent run id)."""
    from mlflow.entities import Metric, Param

    exp = client.get_experiment_by_name(sweep_name)
    eid = exp.experiment_id if exp else client.create_experiment(sweep_name)
    parent = client.create_run(eid, run_name=sweep_name, tags={
        "hpsweep.role": "sweep", "hpsweep.sweep": sweep_name, "hpsweep.spec_hash": "test"})
    pid = parent.info.run_id

    def one(cell) -> None:
        status = status_of(cell)
        if status is None:
            return
        tags = {"mlflow.parentRunId": pid, "hpsweep.role": "cell", "hpsweep.sweep": sweep_name,
                "hpsweep.cell_id": cell.id, "hpsweep.seed": str(cell.seed),
                "hpsweep.params": json.dumps(cell.params), "hpsweep.code_version": "test",
                "hpsweep.version": "test"}
        run = client.create_run(eid, tags=tags)
        rid = run.info.run_id
        now = int(time.time() * 1000)
        ms = [Metric(k, v, now + step, step) for k, series in metrics_of(cell).items()
              for step, v in series]
        ps = [Param(k, str(v)) for k, v in getattr(cell, "config", {}).items()]
        for i in range(0, max(len(ms), 1), 1000):
            client.log_batch(rid, metrics=ms[i:i + 1000], params=ps if i == 0 else [])
        if status != "RUNNING":
            client.set_terminated(rid, status)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, cells))
    client.set_terminated(pid, "FINISHED")
    return eid, pid


class ReportPage(HTMLParser):
    """What a test reads off a report's HTML: the statistic cells (their data-* attributes,
    the text shown, the kind of table they sit in), the images and the links."""

    def __init__(self):
        super().__init__()
        self.stats, self.imgs, self.links, self.tables, self._td = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append(a.get("data-kind"))
        if tag == "td" and "data-metric" in a:
            a["text"], a["table"] = "", self.tables[-1] if self.tables else None
            self._td = a
            self.stats.append(a)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "a":
            self.links.append(a["href"])

    def handle_data(self, data):
        if self._td is not None:
            self._td["text"] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self._td = None
