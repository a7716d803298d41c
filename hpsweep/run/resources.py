"""What a trial asks for against what the machine or the cluster can give.

A trial's resources (``resources:`` in the sweep file) must fit on one Ray node. Ray Tune
waits for ever for a trial no node can hold, with nothing but Ray's "No trial is running ..."
warning once a minute; hpsweep decides before that:

- **In-process Ray** (``hpsweep run`` without ``--address``) will have exactly what Ray
  detects on this machine (:func:`local_offer`, Ray's own resolution of CPUs, GPUs and memory,
  computed without starting Ray): a request beyond it is refused before Ray starts, naming
  the sweep file's line (or the ``--set`` that gave the value) and the fix.
- **On a cluster** (``--address``) the driver reads the alive nodes and, where an autoscaler
  reported them (KubeRay worker groups, the cluster launcher's ``available_node_types``: the
  cluster config in the GCS), the node types with their maximum counts. A request that no
  node and no node type can hold fails at once with what the cluster offers. One a node type
  can hold (or, on a cluster without an autoscaler, one that needs a custom resource no node
  declares yet: such nodes are started by hand) is waited for: :class:`NodeWait` shows it in
  the live table, the driver's log and ``status`` and, after ``--node-wait`` seconds with
  nothing started, stops the sweep, its cells left pending.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from hpsweep.errors import Unusable, UsageError

__all__ = ["node_wait", "request", "describe", "local_offer", "check_local", "NodeType", "ClusterOffer",
           "cluster_offer", "judge", "check_cluster", "NodeWait", "DEFAULT_NODE_WAIT_S"]

#: seconds a sweep on a cluster waits for a node that can hold a trial before it stops
DEFAULT_NODE_WAIT_S = 1800.0

def node_wait(flag: float | None) -> float:
    """Seconds a sweep on a cluster waits for a node that can hold a trial: ``--node-wait``,
    else ``$HPSWEEP_NODE_WAIT``, else :data:`DEFAULT_NODE_WAIT_S`."""
    import os

    if flag is not None:
        return flag
    raw = os.environ.get("HPSWEEP_NODE_WAIT")
    try:
        return float(raw) if raw else DEFAULT_NODE_WAIT_S
    except ValueError:
        raise UsageError(f"HPSWEEP_NODE_WAIT={raw}: give a number of seconds") from None


_FIELDS = {"CPU": ("cpus",), "GPU": ("gpus",), "memory": ("memory",)}
_GIB = 2**30


def request(resources) -> dict[str, float]:
    """A trial's request in Ray's resource names (``CPU``, ``GPU``, ``memory``, custom), zero
    amounts left out."""
    out = {"CPU": resources.cpus, "GPU": resources.gpus, "memory": resources.memory or 0,
           **resources.custom}
    return {k: float(v) for k, v in out.items() if v}


def _amount(name: str, value: float) -> str:
    if name == "memory":
        return f"{value / _GIB:.1f} GiB of memory"
    shown = f"{value:g}"
    unit = {"CPU": "CPU", "GPU": "GPU"}.get(name, repr(name))
    return f"{shown} {unit}{'s' if name in ('CPU', 'GPU') and value != 1 else ''}"


def describe(req: dict[str, float]) -> str:
    """``1 GPU, 2 CPUs`` (GPUs and custom resources first: what a node is chosen by)."""
    order = sorted(req, key=lambda k: ({"CPU": 1, "memory": 2}.get(k, 0), k))
    return ", ".join(_amount(k, req[k]) for k in order)


def _fits(node: dict[str, float], req: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v - 1e-9 for k, v in req.items())


def _field(name: str) -> tuple[str, ...]:
    return ("resources", *_FIELDS.get(name, ("custom", name)))


def _where(spec, name: str) -> str:
    path = _field(name)
    sources = getattr(spec, "_sources", None)
    return sources.where(*path) if sources is not None else "sweep file"


def _fix(name: str, has: float) -> str:
    """The override that makes the request fit ``has``."""
    if name == "memory":
        return f"--set resources.memory={int(has // _GIB)}GiB" if has >= _GIB else "--set resources.memory=null"
    if name == "GPU":
        return "--set resources.gpus=0"
    if name == "CPU":
        return f"--set resources.cpus={int(has) if has >= 1 else has:g}"
    return "--set resources.custom={}"


# --- one machine ----------------------------------------------------------------------------

def local_offer() -> dict[str, float]:
    """What in-process Ray will have on this machine: Ray's own resolution of a head node's
    resources (CPUs within cgroup limits, detected GPUs, memory left after the object store;
    ``RAY_OVERRIDE_RESOURCES`` included), without starting Ray."""
    # isort: off
    # localray first: it sets the variables Ray reads once, when it is imported (in-process Ray
    # on loopback only among them); importing Ray here before it would fix them to Ray's defaults
    from hpsweep.run import localray  # noqa: F401
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec
    # isort: on

    spec = ResourceAndLabelSpec().resolve(is_head=True, node_ip_address="127.0.0.1")
    return {k: float(v) for k, v in spec.to_resource_dict().items()}


def check_local(spec, offer: dict[str, float] | None = None) -> None:
    """Refuse, before Ray starts, a trial this machine cannot hold (every resource at once)."""
    req = request(spec.resources)
    offer = local_offer() if offer is None else offer
    problems = []
    for name, asked in req.items():
        has = offer.get(name, 0.0)
        if has >= asked - 1e-9:
            continue
        field = ".".join(_field(name))
        asked_text = f"{asked / _GIB:.1f} GiB" if name == "memory" else f"{asked:g}"
        if name == "memory":
            what = f"in-process Ray has {_amount(name, has)} for trials on this machine"
        elif not has:
            what = f"this machine has no {'GPU' if name == 'GPU' else repr(name) + ' resource'}"
        else:
            what = f"this machine has {_amount(name, has)}"
        problems.append(f"{_where(spec, name)}: {field}: {asked_text} but {what}; run it on a cluster "
                        f"with --address, or override: {_fix(name, has)}")
    if problems:
        raise Unusable("\n".join(problems))


# --- a cluster ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NodeType:
    """A node type an autoscaler may start: its resources and how many at most (-1: no limit)."""
    name: str
    resources: dict[str, float]
    max_count: int


@dataclasses.dataclass(frozen=True)
class ClusterOffer:
    nodes: list[dict[str, float]]          # each alive node's total resources
    types: list[NodeType]                  # the autoscaler's node types (none: no autoscaler)


def cluster_offer() -> ClusterOffer:
    """The alive nodes of the cluster this driver joined, and its autoscaler's node types."""
    import ray

    nodes = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]
    types: list[NodeType] = []
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older GCS, or none reported: no node types known
        config = None
    for group in getattr(config, "node_group_configs", None) or []:
        types.append(NodeType(group.name, {k: float(v) for k, v in group.resources.items()},
                              int(group.max_count)))
    return ClusterOffer(nodes, types)


def _node_text(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items()
             if not k.startswith(("node:", "accelerator_type:")) and k != "object_store_memory"}
    return describe(shown) or "nothing"


def offer_text(offer: ClusterOffer) -> str:
    """What the cluster offers, for messages: each distinct node, each node type."""
    counts: dict[str, int] = {}
    for node in offer.nodes:
        text = _node_text(node)
        counts[text] = counts.get(text, 0) + 1
    nodes = "; ".join(f"{n} x ({t})" for t, n in counts.items()) or "no node"
    if not offer.types:
        return f"its nodes: {nodes}; no autoscaler node types"
    types = "; ".join(f"{t.name} ({_node_text(t.resources)}, up to "
                      f"{'any number' if t.max_count < 0 else t.max_count})" for t in offer.types)
    return f"its nodes: {nodes}; its autoscaler's node types: {types}"


def judge(req: dict[str, float], offer: ClusterOffer) -> tuple[str, str]:
    """``("ok", "")`` when an alive node can hold a trial; ``("wait", message)`` when a node
    that can may come (a node type fits it, or, without an autoscaler, it needs a custom
    resource no node declares yet); ``("never", "")`` otherwise."""
    if any(_fits(node, req) for node in offer.nodes):
        return "ok", ""
    fitting = [t for t in offer.types if t.max_count != 0 and _fits(t.resources, req)]
    if fitting:
        most = "any number" if any(t.max_count < 0 for t in fitting) else str(sum(t.max_count for t in fitting))
        return "wait", f"waiting for a node with {describe(req)}: 0 of {most} up"
    custom = [k for k in req if k not in ("CPU", "GPU", "memory")]
    if not offer.types and custom and not any(n.get(k) for n in offer.nodes for k in custom):
        return "wait", (f"waiting for a node with {describe(req)}: none up (no autoscaler: "
                        f"a node must join declaring {', '.join(map(repr, custom))})")
    return "never", ""


def check_cluster(spec, address: str, offer: ClusterOffer | None = None) -> str | None:
    """Refuse at once a trial no node of the cluster and no node type of its autoscaler can
    ever hold, with what the cluster offers; return the waiting message when a node that can
    hold it is yet to come, else None."""
    req = request(spec.resources)
    offer = cluster_offer() if offer is None else offer
    verdict, message = judge(req, offer)
    if verdict != "never":
        return message or None
    every = offer.nodes + [t.resources for t in offer.types if t.max_count != 0]
    lines = []
    for name, asked in req.items():
        most = max((n.get(name, 0.0) for n in every), default=0.0)
        if most < asked - 1e-9:
            field = ".".join(_field(name))
            asked_text = f"{asked / _GIB:.1f} GiB" if name == "memory" else f"{asked:g}"
            lines.append(f"{_where(spec, name)}: {field}: {asked_text} but no node of the cluster "
                         f"can give {'it' if not most else 'more than ' + _amount(name, most)}; "
                         f"override: {_fix(name, most)}")
    head = (f"a trial asks for {describe(req)} on one node, and the cluster at {address} can never "
            f"give it ({offer_text(offer)})")
    raise Unusable("\n".join([head, *lines]) if lines else head + "; lower the resources with --set")


class NodeWait:
    """A sweep on a cluster that waits for a node able to hold its trials (see the module
    docstring). The engine calls :meth:`poll` from Tune's loop and :meth:`started` when a trial
    starts; :attr:`expired` ends the sweep. ``show(message, since)`` tells the live table,
    the driver's log and the sweep's run (None: no longer waiting)."""

    def __init__(self, req: dict[str, float], limit_s: float, show: Callable[[str | None, float], None],
                 offer: Callable[[], ClusterOffer] = cluster_offer, every_s: float = 2.0) -> None:
        self.req, self.limit_s, self.show, self.offer, self.every_s = req, limit_s, show, offer, every_s
        self.since = time.time()
        self.message: str | None = None
        self.any_started = False
        self.expired = False
        self._next = 0.0

    def __getstate__(self) -> dict:  # Tune pickles its run config (the stopper, the callbacks)
        return {**self.__dict__, "show": None, "offer": None}

    def started(self) -> None:
        self.any_started = True
        if self.message is not None:
            self.message = None
            self.show(None, self.since)

    def poll(self) -> None:
        if self.any_started or self.expired or time.time() < self._next:
            return
        self._next = time.time() + self.every_s
        verdict, message = judge(self.req, self.offer())
        if verdict == "ok":
            if self.message is not None:
                self.message = None
                self.show(None, self.since)
            return
        self.message = message or f"waiting for a node with {describe(self.req)}"
        self.show(self.message, self.since)
        if time.time() - self.since >= self.limit_s:
            self.expired = True
