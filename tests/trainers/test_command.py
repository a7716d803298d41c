"""The command trainer without Ray: programs in temporary directories outside the checkout, run
through ``train(config, run)`` with a local Run, as a sweep's worker runs them. Processes are
checked in /proc, never in logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpsweep.spec.model import SpecError, load_spec
from hpsweep.trainer.command.config import argv, config_class
from hpsweep.trainer.command.output import JsonLines, LineParser
from hpsweep.trainer.command.training import CommandFailed, MetricNeverSeen, train
from hpsweep.trainer.config import build_config
from hpsweep.trainer.run import LocalRun

REPO = Path(__file__).resolve().parents[2]


def make(values: dict):
    cls = config_class(values)
    config, problems = build_config(cls, values)
    assert not problems, problems
    return config


class SweepRun(LocalRun):
    """A LocalRun whose relative paths resolve under ``base`` (a sweep file's directory) and
    that names the sweep's metric, as a trial's run does."""

    def __init__(self, out: Path, base: Path, metric: str | None = None, stop_after: int = 0) -> None:
        super().__init__(out, bases=[base])
        self.metric = metric
        self.stop_after = stop_after

    class Stop(Exception):
        pass

    def report(self, step, **metrics):
        super().report(step, **metrics)
        if self.stop_after and len(self.history) >= self.stop_after:
            raise self.Stop


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "project"
    d.mkdir()
    assert not d.resolve().is_relative_to(REPO)
    return d


def script(src: Path, name: str, text: str, mode: int = 0o755) -> Path:
    path = src / name
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)
    return path


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# -- output parsing -----------------------------------------------------------------------

def test_pairs_count_steps_per_name_and_take_an_explicit_step() -> None:
    p = LineParser(None)
    assert list(p.parse("epoch 1: loss=0.5 acc: 0.75 at 12:30:01")) == [(1, {"loss": 0.5, "acc": 0.75})]
    assert list(p.parse("loss = 0.25")) == [(2, {"loss": 0.25})]
    assert list(p.parse("step=10 loss=1e-3 val/loss=nan"))[0][0] == 10
    assert list(p.parse("no pairs here, time 12:30")) == []
    assert p.counts["loss"] == 3 and p.seen == {"loss", "acc", "val/loss"}


def test_patterns_name_metrics_with_groups_and_count_their_matches() -> None:
    p = LineParser((r"Test set: Average loss: (?P<test_loss>[0-9.]+), Accuracy: (?P<acc>[0-9.]+)",
                    r"iter (?P<step>\d+) loss (?P<loss>[0-9.]+)"), counts={"pattern0": 4})
    assert list(p.parse("Test set: Average loss: 0.30, Accuracy: 0.91")) == [(5, {"test_loss": 0.3, "acc": 0.91})]
    assert list(p.parse("iter 70 loss 2.5")) == [(70, {"loss": 2.5})]
    assert list(p.parse("loss=1.0")) == []


def test_json_lines_are_read_as_they_grow_whole_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    reader = JsonLines(str(path))
    assert list(reader.read()) == []
    path.write_text('{"step": 3, "loss": 0.5, "note": "x"}\n{"loss": 0.4')
    assert list(reader.read()) == [(3, {"loss": 0.5})]
    with path.open("a") as f:
        f.write('}\nnot json\n{"acc": 1}')
    assert list(reader.read()) == [(2, {"loss": 0.4})]
    assert list(reader.read(last=True)) == [(3, {"acc": 1.0})]
    assert reader.bad == ["not json"]


def test_values_reach_the_program_as_flags_or_through_a_template() -> None:
    base = {"command": ["prog", "--fixed"], "lr": 0.001, "layers": [2, 3], "amp": True, "opt": None}
    assert argv(make(base), "/bin/prog") == ["/bin/prog", "--fixed", "--amp", "true", "--layers", "[2, 3]",
                                            "--lr", "0.001", "--seed", "0"]
    assert argv(make({**base, "args": "+{name}={value}"}), "p")[2:] == ["+amp=true", "+layers=[2, 3]",
                                                                       "+lr=0.001", "+seed=0"]
    assert argv(make({**base, "args": ["lr={lr}", "{seed}"]}), "p")[2:] == ["lr=0.001", "0"]
    assert argv(make({"command": "env {python} -u t.py", "x": 1}), "/usr/bin/env") == [
        "/usr/bin/env", sys.executable, "-u", "t.py", "--x", "1", "--seed", "0"]


# -- validate: every problem at once, FILE:LINE ---------------------------------------------

def test_validate_checks_the_program_patterns_template_and_metric(src: Path) -> None:
    script(src, "data.txt", "not a program\n", mode=0o644)
    path = src / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        name: bad
        trainer: command
        config:
          command: [./data.txt]
          metrics: ['loss (?P<loss>[0-9.]+', 'acc (?P<acc>[0-9.]+)', 'no groups']
          args: ["--lr", "{lrr}"]
        parameters:
          lr: {grid: [0.1]}
        metric: {name: los, mode: min}
    """))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    lines = str(info.value).splitlines()
    assert lines == [
        f"{path}:4: config.command: './data.txt' is not executable (chmod +x it, or run it through its interpreter)",
        f"{path}:5: config.metrics: metrics[0] 'loss (?P<loss>[0-9.]+' does not compile: missing ), "
        "unterminated subpattern at position 5",
        f"{path}:5: config.metrics: metrics[2] 'no groups' names no metric: give a named group, e.g. "
        "'loss (?P<loss>[0-9.eE+-]+)'",
        f"{path}:6: config.args: args '{{lrr}}': 'lrr' is not a value of this sweep (values: lr, seed, and "
        "{{ for a brace)",
        f"{path}:9: metric.name: trainer 'command' does not report 'los'; it reports: acc",
    ], lines
    path.write_text(path.read_text().replace("./data.txt", "no-such-program-here").replace("metrics:", "#"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).splitlines()[0] == (
        f"{path}:4: config.command: 'no-such-program-here' is not a program on PATH (give its path, "
        "or {python} for the Python hpsweep runs under)")


def test_a_good_command_sweep_validates_with_any_metric_by_default(src: Path) -> None:
    script(src, "run.sh", "#!/bin/sh\necho loss=1\n")
    path = src / "ok.yaml"
    path.write_text("name: ok\ntrainer: command\nconfig: {command: [./run.sh], depth: 3}\n"
                    "parameters: {lr: {grid: [0.1, 0.2]}}\nseeds: 2\nmetric: {name: anything, mode: min}\n")
    spec = load_spec(path)
    from hpsweep.spec.plan import plan

    cells = plan(spec)
    assert len(cells) == 4 and {c.config["depth"] for c in cells} == {3}
    assert len({c.id for c in cells}) == 4


# -- running programs ---------------------------------------------------------------------

PY_SCRIPT = """\
    import argparse, os
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    a = p.parse_args()
    import helper                        # beside the script, in the source directory
    data = open("data/values.txt").read().split()   # a relative read
    for i, v in enumerate(data):
        print(f"epoch {i}: loss={float(v) * a.lr + a.seed}", flush=True)
    os.makedirs("data/out", exist_ok=True)
    open("data/out/model.pt", "w").write("weights")   # a relative write: the cell's own
    print(helper.NOTE, os.environ["HPSWEEP_CELL_DIR"] == os.getcwd())
"""


def test_a_python_script_reads_its_source_and_writes_only_its_cell(src: Path, tmp_path: Path) -> None:
    script(src, "train.py", PY_SCRIPT)
    script(src, "helper.py", "NOTE = 'helper imported'\n")
    (src / "data").mkdir()
    (src / "data" / "values.txt").write_text("1 2 3\n")
    run = SweepRun(tmp_path / "out", src, metric="loss")
    train(make({"command": ["{python}", "train.py"], "lr": 0.5, "seed": 1}), run)
    assert [(r["step"], r["loss"]) for r in run.history] == [(1, 1.5), (2, 2.0), (3, 2.5)]
    assert sorted(p.name for p in src.rglob("*")) == ["data", "helper.py", "train.py", "values.txt"]
    log = (tmp_path / "out" / "artifacts" / "output.log").read_text()
    assert "helper imported True" in log


def test_an_awk_program_with_a_pattern_of_its_own(src: Path, tmp_path: Path) -> None:
    script(src, "fit.awk", """\
        #!/usr/bin/awk -f
        BEGIN { for (i = 1; i <= 4; i++) printf "iteration %d | objective %.3f\\n", i * 10, rate / i }
    """)
    run = SweepRun(tmp_path / "out", src)
    train(make({"command": ["./fit.awk"], "args": ["-v", "rate={rate}"], "rate": 2.0,
                "metrics": [r"iteration (?P<step>\d+) \| objective (?P<objective>[0-9.]+)"]}), run)
    assert [(r["step"], r["objective"]) for r in run.history] == [(10, 2.0), (20, 1.0), (30, 0.667), (40, 0.5)]


def test_a_non_zero_exit_fails_with_its_last_lines(src: Path, tmp_path: Path) -> None:
    script(src, "fail.sh", "#!/bin/sh\nfor i in $(seq 1 30); do echo line $i; done\necho 'boom' >&2\nexit 3\n")
    with pytest.raises(CommandFailed) as info:
        train(make({"command": ["./fail.sh"], "args": []}), SweepRun(tmp_path / "out", src))
    assert str(info.value).startswith("command exited with status 3: ")
    assert info.value.tail[-2:] == ("line 30", "boom") and len(info.value.tail) == 15
    assert not isinstance(info.value, ValueError)   # a retry may help: the sweep's retries


def test_a_declared_metric_never_seen_fails_the_cell(src: Path, tmp_path: Path) -> None:
    script(src, "quiet.sh", "#!/bin/sh\necho 'acc 0.5'\necho done\n")
    with pytest.raises(MetricNeverSeen) as info:
        train(make({"command": ["./quiet.sh"], "args": [],
                    "metrics": [r"acc (?P<acc>[0-9.]+)", r"loss (?P<loss>[0-9.]+)"]}), SweepRun(tmp_path / "o", src))
    assert str(info.value).startswith("metric loss never seen in the output of ")
    assert info.value.tail == ("acc 0.5", "done") and isinstance(info.value, ValueError)
    # the default pairs: the sweep's metric is the one expected
    with pytest.raises(MetricNeverSeen, match="^metric val_loss never seen"):
        train(make({"command": ["./quiet.sh"], "args": []}), SweepRun(tmp_path / "p", src, metric="val_loss"))


def test_json_lines_and_a_checkpoint_directory_resume_where_they_were(src: Path, tmp_path: Path) -> None:
    """Stopped after its second report and run again: the checkpoint directory comes back with
    HPSWEEP_RESUME=1 and the program goes on from it; every step once."""
    script(src, "loop.py", """\
        import json, os, sys
        ckpt = os.path.join(os.environ["HPSWEEP_CHECKPOINT_DIR"], "state.json")
        start = json.load(open(ckpt))["step"] if os.environ.get("HPSWEEP_RESUME") == "1" else 0
        with open(os.environ["HPSWEEP_STARTS"], "a") as f:
            f.write(f"{start}\\n")
        for step in range(start + 1, 6):
            tmp = ckpt + ".tmp"   # the step's checkpoint first, then its metrics
            json.dump({"step": step}, open(tmp, "w"))
            os.replace(tmp, ckpt)
            with open(os.environ["HPSWEEP_METRICS_FILE"], "a") as f:
                f.write(json.dumps({"step": step, "loss": 1 / step}) + "\\n")
            print(f"step={step} acc={step / 10}", flush=True)
            import time; time.sleep(0.3)
    """)
    starts = tmp_path / "starts.txt"
    os.environ["HPSWEEP_STARTS"] = str(starts)
    try:
        config = make({"command": ["{python}", "loop.py"], "args": []})
        first = SweepRun(tmp_path / "out", src, stop_after=4)
        with pytest.raises(SweepRun.Stop):
            train(config, first)
        first.close()
        again = SweepRun(tmp_path / "out", src)
        state = again.load_checkpoint()
        assert state is not None and set(state["files"]) == {"state.json"}
        train(config, again)
    finally:
        del os.environ["HPSWEEP_STARTS"]
    resumed_at = int(starts.read_text().split()[1])
    assert starts.read_text().split()[0] == "0" and resumed_at >= 1
    acc = [r["step"] for r in first.history + again.history if "acc" in r]
    assert sorted(set(acc)) == [1, 2, 3, 4, 5]
    later = [r["step"] for r in again.history if "acc" in r]
    assert later == list(range(resumed_at + 1, 6))


def test_cancelling_a_cell_ends_its_whole_process_group(src: Path, tmp_path: Path) -> None:
    """The run stops the trainer (as a scheduler or Ctrl-C does) while the program and a child
    it started ignore nothing: SIGTERM reaches both; one that ignores SIGTERM gets SIGKILL."""
    pids = tmp_path / "pids"
    script(src, "spawn.sh", f"""\
        #!/bin/sh
        trap '' TERM
        sleep 300 &
        echo $$ $! > {pids}
        echo loss=1
        wait
    """)
    run = SweepRun(tmp_path / "out", src, stop_after=1)
    started = time.monotonic()
    with pytest.raises(SweepRun.Stop):
        train(make({"command": ["./spawn.sh"], "args": [], "grace": 1.0}), run)
    assert time.monotonic() - started < 30
    for pid in map(int, pids.read_text().split()):
        assert not alive(pid), f"process {pid} outlived its cell"


def test_no_process_outlives_a_worker_killed_with_sigkill(src: Path, tmp_path: Path) -> None:
    """The worker (here a Python process running train) is SIGKILLed mid-cell: its watcher
    ends the program's group and removes the cell's directory."""
    pids = tmp_path / "pids"
    script(src, "forever.sh", f"""\
        #!/bin/sh
        sleep 300 &
        echo $$ $! "$HPSWEEP_CELL_DIR" > {pids}
        echo loss=1
        wait
    """)
    code = textwrap.dedent(f"""
        from pathlib import Path
        from hpsweep.trainer.command.config import config_class
        from hpsweep.trainer.config import build_config
        from hpsweep.trainer.command.training import train
        from hpsweep.trainer.run import LocalRun
        values = {{"command": ["./forever.sh"], "args": [], "grace": 1.0}}
        config, _ = build_config(config_class(values), values)
        train(config, LocalRun({str(tmp_path / 'out')!r}, bases=[Path({str(src)!r})]))
    """)
    worker = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while not (pids.exists() and len(pids.read_text().split()) == 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        shell, sleeper, cell_dir = pids.read_text().split()
        assert alive(int(shell)) and alive(int(sleeper))
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        deadline = time.monotonic() + 30
        while (alive(int(shell)) or alive(int(sleeper))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(int(shell)) and not alive(int(sleeper)), "the program outlived its worker"
        deadline = time.monotonic() + 10
        while Path(cell_dir).parent.exists() and time.monotonic() < deadline:   # rmtree goes bottom-up
            time.sleep(0.05)
        assert not Path(cell_dir).parent.exists(), "the cell's directory was left behind"
    finally:
        if worker.poll() is None:
            worker.kill()


def test_the_example_script_validates_and_runs_as_a_user_has_it(tmp_path: Path) -> None:
    """examples/command-script, copied out of the checkout: its sweep validates, and a cell of it
    reports every epoch's loss and the test metrics; the copy is left as it was."""
    import shutil

    from hpsweep.spec.plan import plan

    copy = tmp_path / "command-script"
    shutil.copytree(REPO / "examples" / "command-script", copy)
    before = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    spec = load_spec(copy / "sweep.yaml")
    cell = plan(spec)[0]
    config = make(cell.config)
    run = SweepRun(tmp_path / "out", copy, metric=spec.metric.name)
    train(config, run)
    epochs = [r["step"] for r in run.history if "loss" in r]
    assert epochs == list(range(1, cell.config["epochs"] + 1))
    (final,) = [r for r in run.history if "test_loss" in r]
    assert 0 < final["test_loss"] < 1 and 50 <= final["test_acc"] <= 100
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == before
