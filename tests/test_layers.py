"""The package's layers point one way (``vixml_ray.LAYERS``): no module imports a layer above its own, and no import
cycle exists between modules. Every import counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vixml_ray

PACKAGE = Path(vixml_ray.__file__).resolve().parent


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path, known: set[str]) -> set[str]:
    """The project modules that ``path`` imports (``from pkg import name`` counts ``pkg.name`` when that is a module)."""
    name = module_name(path, root)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    root_name = root.name
    return {m for m in found if m in known and m.split(".")[0] == root_name and m != name}


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    return {name: imports_of(path, root, known) for name, path in files.items()}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...]) -> list[str]:
    rank = {name: i for i, group in enumerate(layers) for name in group}
    problems = []
    for module, targets in sorted(graph.items()):
        if unit(module) == "":
            continue  # the package's own __init__ holds only the layer table
        if unit(module) not in rank:
            problems.append(f"{module}: its unit {unit(module)!r} is in no layer of LAYERS")
            continue
        for target in sorted(targets):
            if unit(target) and unit(target) != unit(module) and rank.get(unit(target), -1) >= rank[unit(module)]:
                problems.append(f"{module} imports {target}: layer {unit(target)!r} is not below {unit(module)!r}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exporting its own modules is not a cycle: drop edges from a package to its
    submodules (a submodule importing its package's ``__init__`` still counts)."""
    return {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}


def test_no_upward_import():
    problems = upward_imports(import_graph(PACKAGE), vixml_ray.LAYERS)
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    found = cycles(without_package_inits(import_graph(PACKAGE)))
    assert not found, found


def test_every_unit_has_a_layer():
    units = {unit(m) for m in import_graph(PACKAGE)} - {""}
    layered = {name for group in vixml_ray.LAYERS for name in group}
    assert units <= layered, units - layered


@pytest.fixture
def toy_package(tmp_path: Path) -> Path:
    root = tmp_path / "toy"
    (root / "data").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "storage.py").write_text("import os\n")
    (root / "data" / "__init__.py").write_text("")
    (root / "data" / "read.py").write_text("from toy import storage\n")
    return root


def test_checks_catch_an_upward_import_and_a_cycle(toy_package: Path):
    layers = (("storage",), ("data",))
    assert upward_imports(import_graph(toy_package), layers) == []
    (toy_package / "storage.py").write_text("def f():\n    from toy.data.read import x\n")  # lazy, still upward
    assert upward_imports(import_graph(toy_package), layers) == [
        "toy.storage imports toy.data.read: layer 'data' is not below 'storage'"
    ]
    assert cycles(without_package_inits(import_graph(toy_package))) == [["toy.data.read", "toy.storage"]]
