"""The package layout's rules, checked on the source: no import cycle in either
package, DeepSpeed known only to the strategy layer, and `data_pipelines` importing
nothing of the trainer but its model loaders (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qwenimg_train", "data_pipelines")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its body (function-level imports
    count too: a cycle through a deferred import is still a cycle of concerns), except in
    its `if __name__ == "__main__":` block, the `python -m` entry point into the CLI."""
    is_package = path.name == "__init__.py"
    out = set()
    tree = ast.parse(path.read_text())
    tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    # A package's __init__ is not a dependency of its submodules' users (importing
    # a.b runs a/__init__), so edges go module -> module only.
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_strategy_layer_knows_deepspeed():
    offenders = []
    for name, path in _modules().items():
        if name.startswith("qwenimg_train.parallel"):
            continue
        source = path.read_text()
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "deepspeed" for a in node.names):
                offenders.append(f"{name}: import deepspeed")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "deepspeed":
                offenders.append(f"{name}: from {node.module}")
            elif isinstance(node, ast.Constant) and node.value in ("ds_shape", "ds_tensor", "ds_id", "ds_numel"):
                offenders.append(f"{name}: duck-types {node.value!r}")
            elif isinstance(node, ast.Attribute) and node.attr in ("ds_shape", "ds_tensor", "ds_id", "ds_numel"):
                offenders.append(f"{name}: duck-types .{node.attr}")
    assert not offenders, offenders


def test_data_pipelines_imports_only_model_loaders_from_the_trainer():
    graph = _graph()
    allowed = {"qwenimg_train.models"}
    offenders = sorted(f"{name} -> {dep}" for name, deps in graph.items() if name.startswith("data_pipelines")
                       for dep in deps if dep.startswith("qwenimg_train") and dep not in allowed)
    assert not offenders, offenders
