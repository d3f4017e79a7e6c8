"""The package's layers import only downward, and no modules import each other in a cycle.

Layers (DESIGN.md, "Shape of the package")::

    config.py (0) -> core/ (1) -> methods/ (2) -> formats/ integrations/ (3) -> train/ (4)
    -> cli/ serve/ export/ (5) -> deltatune/__init__.py, __main__.py (the top)

Every module under ``src/deltatune`` is read with ``ast`` (not imported): every ``import`` and
``from ... import`` counts, at module level, inside functions and under ``TYPE_CHECKING`` alike;
relative imports are resolved. ``from package import name`` is an import of ``package.name`` when
that is a module, else of ``package``. Importing the top-level ``deltatune`` package from inside it
counts as importing every module its ``__init__`` imports.

There is no exceptions list: an upward import or a cycle is a design error to fix where it is.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
TOP = "deltatune"
LAYERS = {"_version": 0, "config": 0, "core": 1, "methods": 2, "formats": 3, "integrations": 3, "train": 4,
          "cli": 5, "serve": 5, "export": 5, "__main__": 6}
TOP_LAYER = 6

def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / TOP).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def layer(module: str) -> int:
    if module == TOP:
        return TOP_LAYER
    head = module.split(".")[1]
    assert head in LAYERS, f"{module} is in no layer: add {head!r} to LAYERS (and to DESIGN.md)"
    return LAYERS[head]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import names, relative ones resolved against ``module``."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(module: str) -> Iterator[str]:
    """The deltatune modules ``module`` names in its import statements (anywhere in the file)."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        else:
            continue
        for target in targets:
            # ``import deltatune.core.inject`` names the module; a non-module tail is an attribute.
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target in MODULES and target.split(".")[0] == TOP:
                yield target


def graph() -> dict[str, set[str]]:
    """Module -> the modules it imports; an import of the top package stands for what it imports."""
    direct = {m: set(_imported(m)) for m in MODULES}
    top = direct[TOP] - {TOP}
    return {m: {t for i in imports for t in (top if i == TOP and m != TOP else {i})} - {m}
            for m, imports in direct.items()}


def upward(edges: dict[str, set[str]]) -> set[str]:
    return {f"{a} -> {b}" for a, targets in edges.items() for b in targets if layer(b) > layer(a)}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer(module)


def test_imports_go_only_downward_and_never_in_a_cycle():
    edges = graph()
    new = sorted(upward(edges))
    assert not new, "upward imports:\n  " + "\n  ".join(new)
    found = cycles(edges)
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_function_level_relative_and_top_package_imports(tmp_path, monkeypatch):
    pkg = tmp_path / TOP
    (pkg / "core").mkdir(parents=True)
    (pkg / "methods").mkdir()
    (pkg / "__init__.py").write_text("from deltatune.methods import m\n")
    (pkg / "config.py").write_text("def f():\n    from .core import a\n")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("import deltatune\n")
    (pkg / "core" / "b.py").write_text("from . import a\n")
    (pkg / "methods" / "__init__.py").write_text("")
    (pkg / "methods" / "m.py").write_text("from ..core import b\n")
    monkeypatch.setitem(globals(), "SRC", tmp_path)
    monkeypatch.setitem(globals(), "MODULES", _modules())
    edges = graph()
    assert edges["deltatune.config"] == {"deltatune.core.a"}
    assert edges["deltatune.core.a"] == {"deltatune.methods.m"}  # the top package stands for its imports
    assert upward(edges) == {"deltatune.config -> deltatune.core.a", "deltatune.core.a -> deltatune.methods.m"}
    assert cycles(edges) == [["deltatune.core.a", "deltatune.core.b", "deltatune.methods.m"]]
