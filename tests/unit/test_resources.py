"""A trial's resources against what this machine or a cluster can give: refused before anything
starts when nothing ever can, waited for (with a limit) when a node that can may come."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpsweep.errors import Unusable
from hpsweep.run.resources import ClusterOffer, NodeType, NodeWait, check_cluster, check_local, judge, local_offer
from hpsweep.spec.model import load_spec_text

SWEEP = """\
name: t
trainer: sleep
parameters:
  x: {grid: [0.0, 1.0]}
metric: {name: loss, mode: min}
resources:
  cpus: 1
  gpus: 0.25
"""
GIB = 2**30
LAPTOP = {"CPU": 2.0, "memory": 14.5 * GIB, "object_store_memory": 6.0 * GIB, "node:127.0.0.1": 1.0}


def _spec(*overrides: str):
    return load_spec_text(SWEEP, "s.yaml", overrides=overrides)


def _refusal(spec, offer) -> list[str]:
    with pytest.raises(Unusable) as info:
        check_local(spec, offer)
    return str(info.value).splitlines()


def test_a_gpu_share_on_a_machine_without_a_gpu_names_the_line_and_the_fix() -> None:
    assert _refusal(_spec(), LAPTOP) == [
        "s.yaml:8: resources.gpus: 0.25 but this machine has no GPU; run it on a cluster with --address, "
        "or override: --set resources.gpus=0"]
    check_local(_spec("resources.gpus=0"), LAPTOP)  # the override the message gives is enough
    check_local(_spec(), {**LAPTOP, "GPU": 1.0})


def test_every_resource_beyond_the_machine_at_once_named_by_its_override() -> None:
    lines = _refusal(_spec("resources.cpus=4", "resources.memory=64GiB", "resources.custom.special=1"), LAPTOP)
    assert lines == [
        "--set resources.cpus=4: resources.cpus: 4 but this machine has 2 CPUs; run it on a cluster with "
        "--address, or override: --set resources.cpus=2",
        "s.yaml:8: resources.gpus: 0.25 but this machine has no GPU; run it on a cluster with --address, "
        "or override: --set resources.gpus=0",
        "--set resources.memory=64GiB: resources.memory: 64.0 GiB but in-process Ray has 14.5 GiB of memory "
        "for trials on this machine; run it on a cluster with --address, or override: --set resources.memory=14GiB",
        "--set resources.custom.special=1: resources.custom.special: 1 but this machine has no 'special' "
        "resource; run it on a cluster with --address, or override: --set resources.custom={}",
    ]
    check_local(_spec("resources.gpus=0", "resources.cpus=2", "resources.memory=14GiB"), LAPTOP)


def test_the_local_offer_is_what_in_process_ray_gets() -> None:
    """Ray's own resolution: the CPUs Ray counts (cgroup limits included), no more."""
    import ray._private.utils

    offer = local_offer()
    assert offer["CPU"] == ray._private.utils.get_num_cpus()
    assert 0 < offer["memory"] < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_run_refuses_before_ray_starts(tmp_path) -> None:
    """`gpus` beyond this machine's GPUs, `cpus` beyond its CPUs, `memory` beyond it: exit 2,
    every problem at once, no Ray session, no tracking store, no storage."""
    offer = local_offer()
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP.replace("gpus: 0.25", f"gpus: {int(offer.get('GPU', 0)) + 1}")
                     .replace("cpus: 1", f"cpus: {int(offer['CPU']) + 2}")
                     + f"  memory: {int(offer['memory'] // GIB) + 64}GiB\n")
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    env.pop("HPSWEEP_RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", "hpsweep.cli", "run", "s.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert [line.split(": ")[1] for line in lines] == ["resources.cpus", "resources.gpus", "resources.memory"]
    assert lines[0].startswith("s.yaml:7: resources.cpus: ")
    assert lines[1].startswith("s.yaml:8: resources.gpus: ")
    assert all("override: --set resources." in line for line in lines)
    assert "Traceback" not in out.stderr
    assert list(ray_tmp.iterdir()) == []                 # Ray never started
    assert not (tmp_path / ".hpsweep").exists()          # nothing tracked, nothing stored


# --- a cluster ---------------------------------------------------------------------------------

NODES = [{"CPU": 2.0, "memory": 8.0 * GIB, "node:127.0.0.1": 1.0},
         {"CPU": 2.0, "GPU": 1.0, "second_node": 2.0, "memory": 8.0 * GIB}]
GPU_GROUP = NodeType("gpu-workers", {"CPU": 8.0, "GPU": 1.0, "memory": 32.0 * GIB}, 4)


@pytest.mark.parametrize(("req", "offer", "verdict", "message"), [
    ({"CPU": 1.0, "GPU": 1.0}, ClusterOffer(NODES, []), "ok", ""),
    ({"CPU": 4.0}, ClusterOffer(NODES, []), "never", ""),
    ({"CPU": 1.0, "GPU": 2.0}, ClusterOffer(NODES, []), "never", ""),
    # an autoscaler that may start a node that holds it: waited for
    ({"CPU": 4.0, "GPU": 1.0}, ClusterOffer(NODES[:1], [GPU_GROUP]), "wait",
     "waiting for a node with 1 GPU, 4 CPUs: 0 of 4 up"),
    ({"GPU": 1.0}, ClusterOffer(NODES[:1], [GPU_GROUP, NodeType("more", {"GPU": 2.0}, -1)]), "wait",
     "waiting for a node with 1 GPU: 0 of any number up"),
    # a node type with max 0 never comes
    ({"GPU": 1.0}, ClusterOffer(NODES[:1], [NodeType("off", {"GPU": 1.0}, 0)]), "never", ""),
    ({"GPU": 2.0}, ClusterOffer(NODES[:1], [GPU_GROUP]), "never", ""),
    # no autoscaler: a custom resource no node declares yet may come with a node started by hand
    ({"CPU": 1.0, "special": 1.0}, ClusterOffer(NODES, []), "wait",
     "waiting for a node with 1 'special', 1 CPU: none up (no autoscaler: a node must join declaring 'special')"),
    ({"CPU": 1.0, "second_node": 1.0}, ClusterOffer(NODES, []), "ok", ""),
    ({"CPU": 4.0, "second_node": 1.0}, ClusterOffer(NODES, []), "never", ""),
])
def test_judge(req, offer, verdict, message) -> None:
    assert judge(req, offer) == (verdict, message)


def test_a_request_no_node_can_ever_give_fails_with_the_offer() -> None:
    with pytest.raises(Unusable) as info:
        check_cluster(_spec("resources.gpus=2"), "127.0.0.1:6379", ClusterOffer(NODES, [GPU_GROUP]))
    assert str(info.value).splitlines() == [
        "a trial asks for 2 GPUs, 1 CPU on one node, and the cluster at 127.0.0.1:6379 can never give it "
        "(its nodes: 1 x (2 CPUs, 8.0 GiB of memory); 1 x (1 GPU, 2 'second_node', 2 CPUs, 8.0 GiB of memory); "
        "its autoscaler's node types: gpu-workers (1 GPU, 8 CPUs, 32.0 GiB of memory, up to 4))",
        "--set resources.gpus=2: resources.gpus: 2 but no node of the cluster can give more than 1 GPU; "
        "override: --set resources.gpus=0",
    ]
    assert check_cluster(_spec("resources.gpus=1"), "a", ClusterOffer(NODES, [])) is None
    assert check_cluster(_spec("resources.gpus=1", "resources.cpus=8"), "a", ClusterOffer(NODES, [GPU_GROUP])) \
        == "waiting for a node with 1 GPU, 8 CPUs: 0 of 4 up"


def test_node_wait_shows_the_wait_and_gives_up_after_its_limit() -> None:
    shown: list[str | None] = []
    offers = [ClusterOffer(NODES[:1], [GPU_GROUP])]
    wait = NodeWait({"GPU": 1.0}, limit_s=0.3, show=lambda m, since: shown.append(m),
                    offer=lambda: offers[-1], every_s=0.0)
    wait.poll()
    assert shown == ["waiting for a node with 1 GPU: 0 of 4 up"] and not wait.expired
    offers.append(ClusterOffer(NODES, [GPU_GROUP]))  # the node came: no longer waiting
    wait.poll()
    assert shown[-1] is None and not wait.expired
    offers.append(ClusterOffer(NODES[:1], [GPU_GROUP]))
    import time

    time.sleep(0.35)
    wait.poll()
    assert wait.expired  # nothing started within the limit
    started = NodeWait({"GPU": 1.0}, limit_s=0.0, show=lambda m, s: None, offer=lambda: offers[0], every_s=0.0)
    started.started()
    started.poll()
    assert not started.expired  # once a trial started, the sweep never stops for this


def test_shipped_paper_sweeps_say_how_to_run_on_a_laptop() -> None:
    """Each paper-sized sweep's comments give the command that runs it here: it validates,
    asks for no GPU and no more CPUs than this machine has, and makes other cells."""
    import shlex

    from hpsweep.spec.plan import plan

    root = Path(__file__).resolve().parents[2] / "sweeps"
    checked = 0
    for path in sorted(root.glob("*.yaml")):
        text = path.read_text()
        spec = load_spec_text(text, str(path), path.parent)
        if not spec.resources.gpus:
            continue
        lines = text.split("#   hpsweep run ", 1)[1].split("\n")
        command = lines[0]
        for line in lines[1:]:
            if not command.endswith("\\"):
                break
            command = command[:-1] + line.lstrip("# ")
        words = shlex.split(command)
        assert words[0] == f"sweeps/{path.name}"
        overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        small = load_spec_text(text, str(path), path.parent, overrides)
        assert small.resources.gpus == 0 and small.resources.cpus <= local_offer()["CPU"]
        check_local(small)
        assert not {c.id for c in plan(small)} & {c.id for c in plan(spec)}, path.name
        checked += 1
    assert checked == 6


def test_job_status_reads_what_a_running_driver_waits_for_from_its_log() -> None:
    from hpsweep.cluster.jobs import _waiting_line

    waiting = "waiting for a node with 1 GPU: 0 of 4 up (waiting 30s)"
    log = f"sweep 's': 4 cells, 0 already finished, 4 to run\n{waiting.replace('30s', '0s')}\n{waiting}\n"
    assert _waiting_line(log) == waiting
    assert _waiting_line(log + "a node can hold the trials now (waited 41s)\n[1/4] done x=0\n") is None
    assert _waiting_line("sweep 's': 4 cells\n") is None


def test_the_waiting_limit_comes_from_the_flag_then_the_environment(monkeypatch) -> None:
    from hpsweep.errors import UsageError
    from hpsweep.run.resources import DEFAULT_NODE_WAIT_S, node_wait

    monkeypatch.delenv("HPSWEEP_NODE_WAIT", raising=False)
    assert node_wait(None) == DEFAULT_NODE_WAIT_S
    monkeypatch.setenv("HPSWEEP_NODE_WAIT", "90")
    assert node_wait(None) == 90.0 and node_wait(5.0) == 5.0
    monkeypatch.setenv("HPSWEEP_NODE_WAIT", "soon")
    with pytest.raises(UsageError, match="HPSWEEP_NODE_WAIT=soon: give a number of seconds"):
        node_wait(None)
