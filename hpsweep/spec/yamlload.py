"""Safe YAML loading that keeps line numbers, refuses duplicate keys and alias bombs.

``yaml.safe_load`` already refuses tags that construct Python objects, but it silently keeps
the last of two duplicate keys, forgets where every value came from, and expands a
"billion laughs" document until memory runs out. Here the document is composed into nodes
(aliases stay shared, so composing is cheap), then constructed by a walk that counts every
node it visits and stops at a budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["YamlProblem", "LoadedYaml", "load_yaml_text", "MAX_NODES"]

#: Nodes a document may expand to (aliases counted every time they are used).
MAX_NODES = 200_000

_STANDARD_TAGS = {
    "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null", "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
}


@dataclass
class YamlProblem:
    line: int | None
    path: str
    message: str


@dataclass
class LoadedYaml:
    data: Any
    lines: dict[tuple, int] = field(default_factory=dict)   # path tuple -> 1-based line
    problems: list[YamlProblem] = field(default_factory=list)

    def line_of(self, path: tuple) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)


class _BudgetExceeded(Exception):
    pass


def load_yaml_text(text: str) -> LoadedYaml:
    """Parse ``text``; syntax errors and refused constructs come back as problems, not raised."""
    result = LoadedYaml(data=None)
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else None
            problem = exc.problem or str(exc)
            result.problems.append(YamlProblem(line, "", f"YAML syntax error: {problem}"))
            return result
        except yaml.YAMLError as exc:
            result.problems.append(YamlProblem(None, "", f"YAML error: {exc}"))
            return result
        if node is None:
            return result
        counter = [0]
        try:
            result.data = _construct(loader, node, (), result, counter)
        except _BudgetExceeded:
            result.data = None
            result.problems.append(YamlProblem(
                node.start_mark.line + 1, "",
                f"document expands to more than {MAX_NODES:,} nodes through aliases "
                "(an alias bomb?); refusing to load it"))
        return result
    finally:
        loader.dispose()


def _construct(loader: yaml.SafeLoader, node: yaml.Node, path: tuple, result: LoadedYaml,
               counter: list[int]) -> Any:
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise _BudgetExceeded
    result.lines.setdefault(path, node.start_mark.line + 1)
    if node.tag not in _STANDARD_TAGS:
        result.problems.append(YamlProblem(
            node.start_mark.line + 1, _dotted(path),
            f"tag {node.tag!r} is not allowed (only plain YAML data: mappings, lists, "
            "strings, numbers, booleans, null)"))
        return None
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _construct(loader, key_node, path, result, counter)
            if isinstance(key, (list, dict)) or key is None and key_node.tag != "tag:yaml.org,2002:null":
                result.problems.append(YamlProblem(key_node.start_mark.line + 1, _dotted(path),
                                                   "mapping keys must be plain scalars"))
                continue
            if key in out:
                first = result.lines.get(path + (key,))
                result.problems.append(YamlProblem(
                    key_node.start_mark.line + 1, _dotted(path + (key,)),
                    f"duplicate key (first defined on line {first}); remove one of them"))
                continue
            result.lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _construct(loader, value_node, path + (key,), result, counter)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, item, path + (i,), result, counter) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)
