"""The command line: exit codes and messages for user errors, no tracebacks, nothing launched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpsweep.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOOD = "name: t\ntrainer: sleep\nmetric: {name: loss, mode: min}\nparameters:\n  x: {grid: [0.0, 1.0]}\nseeds: 2\n"


def test_validate_every_shipped_sweep(capsys) -> None:
    files = sorted(str(p) for p in (ROOT / "sweeps").glob("*.yaml"))
    assert len(files) >= 5
    assert main(["validate", *files]) == 0
    out = capsys.readouterr().out
    assert out.count("ok: ") == len(files)


def test_validate_bad_file_exit_2_no_traceback(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ntrainer: sleep\nmetric: {name: loss, mode: min}\nsearch: {algoritm: grid}\n")
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    assert main(["validate", str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert f"{bad}:4: search.algoritm: unknown key (did you mean 'algorithm'?)" in captured.err
    assert "Traceback" not in captured.err and "ok: " in captured.out


def test_run_with_a_bad_file_starts_nothing(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ntrainer: sleeep\nmetric: {name: loss, mode: min}\n")
    # in a process of its own: whether ray.tune was imported does not depend on other tests
    probe = ("import sys; from hpsweep.cli import main; code = main(['run', sys.argv[1]]); "
             "print('RAY_TUNE' if 'ray.tune' in sys.modules else 'NO_RAY_TUNE'); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", probe, str(bad)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "unknown trainer 'sleeep' (did you mean 'sleep'?); registered trainers: command, mbpa, sleep, snap" \
        in proc.stderr
    assert proc.stdout.strip() == "NO_RAY_TUNE", "a bad sweep file imported ray.tune"
    assert not (tmp_path / ".hpsweep").exists(), "something was created for a bad sweep"


def test_run_with_an_unreachable_tracking_server(tmp_path, capsys) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    assert main(["run", str(good), "--tracking-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "--tracking-uri http://127.0.0.1:9: no MLflow server answers there" in err


def test_debug_shows_the_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "hpsweep.cli", "--debug", "validate", "/nonexistent.yaml"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "/nonexistent.yaml: no such file" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "hpsweep.cli", "validate", "/nonexistent.yaml"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.slow  # the first use of a SQLite store migrates its schema: ~10 s
def test_status_and_results_of_a_sweep_not_run_yet(tmp_path, capsys) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["status", str(good), "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "pending 4" in out and "done 0" in out
    assert main(["results", str(good), "--tracking-uri", uri, "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    assert [g["missing"] for g in groups] == [2, 2] and all(g["n"] == 0 for g in groups)
    assert main(["results", str(good), "--tracking-uri", uri, "--group-by", "nope"]) == 2
    assert "--group-by: nope not swept" in capsys.readouterr().err


def test_schema_is_json(capsys) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "hpsweep sweep file"


@pytest.mark.parametrize("argv", [["run"], ["status", "--limit", "x"], ["bogus"]])
def test_usage_errors_exit_2(argv) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_the_quickstart_states_its_time_as_the_readme_does() -> None:
    root = Path(__file__).resolve().parents[2]
    sweep = (root / "sweeps" / "quickstart.yaml").read_text()
    readme = (root / "README.md").read_text()
    assert "under a minute on 2 CPU cores" in sweep and "Under a minute on 2 CPU cores" in readme
    assert "two minutes" not in sweep
