"""The import graph of hpsweep/: no cycle (imports inside functions count; those only for type
checkers do not); the packages import one way, in the order of the flow (cli -> cluster -> run ->
views -> spec | store -> trainer); ray.tune only in run/engine.py, MLflow only in store/; the
public trainer API imports no torch, Ray or MLflow; no module over 500 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "hpsweep"


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:``."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(n.lineno for n in ast.walk(sub) if hasattr(n, "lineno"))
    return lines


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names), with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_only(tree)
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return out


def graph() -> dict[str, set[str]]:
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for name, _ in imports(path):
            if name in mods and name != mod:
                edges[mod].add(name)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_hpsweep():
    edges = graph()
    assert "hpsweep.spec.model" in edges and "hpsweep.store.mlflow" in edges["hpsweep.views.report"]
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_only_the_engine_imports_ray_tune():
    users = sorted(
        f"{path.relative_to(PKG.parent)}:{line}"
        for path in PKG.rglob("*.py")
        for name, line in imports(path)
        if name == "ray.tune" or name.startswith("ray.tune.")
    )
    assert users and all(u.startswith("hpsweep/run/engine.py:") for u in users), users


def test_tag_names_and_the_mlflow_client_live_in_the_store():
    for path in PKG.rglob("*.py"):
        if path.relative_to(PKG).parts[0] == "store":
            continue
        text = path.read_text(encoding="utf-8")
        assert "MlflowClient" not in text, path
        assert "'hpsweep.cell" not in text and '"hpsweep.cell' not in text, path


#: a package (or top-level module) of hpsweep/ may import only those of a higher number: the
#: flow read from the user's side down to the trainer contract (the CLI a shell over the Python API:
#: cli -> api); spec and store share a rank and
#: import neither each other; errors, fmt and the package root (its version) are leaves every layer may use;
#: scaffold (``hpsweep new``, which cli registers) ranks with cluster
RANK = {"__init__": 6, "cli": 0, "api": 0.5, "scaffold": 1, "cluster": 1, "run": 2, "views": 3, "spec": 4, "store": 4,
        "trainer": 5, "errors": 6, "fmt": 6}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in edges.items():
        for target in targets:
            a, b = _layer(mod), _layer(target)
            if a != b and RANK[b] <= RANK[a]:
                bad.append(f"{mod} -> {target}")
    return sorted(bad)


def test_every_package_has_a_rank():
    assert {_layer(m) for m in graph()} <= set(RANK), {_layer(m) for m in graph()} - set(RANK)


def test_the_layer_rule_catches_an_arrow_back_up():
    assert layer_violations({"hpsweep.spec.plan": {"hpsweep.run.engine"}}) == \
        ["hpsweep.spec.plan -> hpsweep.run.engine"]
    assert layer_violations({"hpsweep.store.runs": {"hpsweep.spec.model"}}) == \
        ["hpsweep.store.runs -> hpsweep.spec.model"]
    assert layer_violations({"hpsweep.run.engine": {"hpsweep.views.live"}}) == []


def test_packages_import_one_way_down_the_flow():
    assert layer_violations(graph()) == []


def _users(prefixes: tuple[str, ...], top_level_only: bool = False) -> list[str]:
    out = []
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lines = None
        if top_level_only:   # statements run at import time: module level, not inside a def
            lines = {n.lineno for stmt in tree.body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                          ast.ClassDef))
                     for n in ast.walk(stmt) if hasattr(n, "lineno")}
        for name, line in imports(path):
            if lines is not None and line not in lines:
                continue
            if any(name == p or name.startswith(p + ".") for p in prefixes):
                out.append(f"{path.relative_to(PKG.parent)}:{line}")
    return sorted(out)


def test_only_the_store_imports_mlflow():
    users = _users(("mlflow",))
    assert users, "the store imports MLflow's client"
    assert all(u.startswith("hpsweep/store/") for u in users), users


def test_the_trainer_api_imports_no_torch_ray_or_mlflow_at_import_time():
    users = [u for u in _users(("torch", "ray", "mlflow"), top_level_only=True) if u.startswith("hpsweep/trainer/")]
    assert users == [], users
    # and for real: every module of the API imported in a fresh interpreter (-X importtime lists
    # each module as it is loaded)
    mods = sorted(".".join(p.relative_to(PKG.parent).with_suffix("").parts)
                  for p in (PKG / "trainer").rglob("*.py") if p.stem not in ("__init__", "__main__"))
    code = "import hpsweep.trainer, " + ", ".join(mods) + "; from hpsweep.trainer import Run, LocalRun, DataPath"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                         check=True).stderr
    loaded = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.splitlines() if "|" in line}
    assert "hpsweep" in loaded   # the listing is read right
    assert not loaded & {"torch", "ray", "mlflow"}, sorted(loaded & {"torch", "ray", "mlflow"})


def test_no_module_over_500_lines():
    big = {str(p.relative_to(PKG.parent)): n
           for p in [*PKG.rglob("*.py"), *(PKG.parent / "trainers").rglob("*.py")]
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert big == {}, big
