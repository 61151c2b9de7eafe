"""The package's layers form a DAG (ARCHITECTURE.md): imports only go down, no cycles, and no
function-local import hides one (only optional heavy dependencies are imported lazily)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sparsealloc"

LAYERS = [
    {"__init__", "errors", "io", "progress", "cache", "protocol", "outputs", "memory"},
    {"models", "data"},
    {"runner", "pruners", "stats", "blockwise", "evaluation", "probe"},
    {"session"},
    {"tuning"},
    {"allocation"},
    {"frontier", "plan", "rows"},
    {"report"},
    {"jobs"},
    {"cli", "__main__"},
]
LAZY_OK = {"transformers", "datasets", "lm_eval", "yaml", "pyarrow", "gguf", "rich", "accelerate",
           "huggingface_hub"}


def _unit(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


def _layer(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"{unit} is in no layer of ARCHITECTURE.md; add it to LAYERS")


def _module(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["sparsealloc", *parts])


def _imports(path: Path):
    """(target module, lineno, is_module_level) of every sparsealloc import in ``path``."""
    tree = ast.parse(path.read_text())
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    top = set(id(n) for n in tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("sparsealloc"):
                yield target, node.lineno, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sparsealloc"):
                    yield alias.name, node.lineno, id(node) in top


def _files():
    return sorted(p for p in SRC.rglob("*.py"))


def test_imports_only_go_down_the_layers():
    bad = []
    for path in _files():
        here = _layer(_unit(path))
        for target, line, _ in _imports(path):
            parts = target.split(".")
            if len(parts) < 2:
                continue
            there = _layer(parts[1])
            if there > here:
                bad.append(f"{path.relative_to(SRC)}:{line} imports {target} (layer {there} > "
                           f"{here})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    modules = {_module(p) for p in _files()}
    for path in _files():
        deps = set()
        for target, _, _ in _imports(path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != _module(path):
                deps.add(target)
        graph[_module(path)] = deps
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, ()):
            if dep.startswith(node + "."):
                continue  # a package importing its own submodules
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_function_local_imports_only_for_optional_heavy_dependencies():
    bad = []
    for path in _files():
        if path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    name = (node.module or "") if isinstance(node, ast.ImportFrom) else \
                        node.names[0].name
                    if getattr(node, "level", 0) or name.split(".")[0] not in LAZY_OK:
                        bad.append(f"{path.relative_to(SRC)}:{node.lineno} imports {name}")
    assert not bad, "\n".join(bad)
