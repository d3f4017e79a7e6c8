"""The modules of ``deltatune.train`` import one another without a cycle: every import counts,
function-level ones and those under ``if TYPE_CHECKING:`` included (a task names ``TrainConfig``
as a type, so the config's shape, schema.py, sits below the task registry and config.py above it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import deltatune.train

TRAIN = Path(deltatune.train.__file__).parent


def _imports(path: Path) -> set[str]:
    modules = {p.stem for p in TRAIN.glob("*.py")} - {"__init__"}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "deltatune.train":
                found |= {a.name for a in node.names if a.name in modules}
            elif node.module.startswith("deltatune.train."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("deltatune.train.")}
    return found


def test_no_import_cycle_inside_train() -> None:
    graph = {p.stem: _imports(p) for p in TRAIN.glob("*.py") if p.stem != "__init__"}

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            assert dep not in path, "import cycle: " + " -> ".join([*path[path.index(dep):], dep])
            visit(dep, [*path, dep])

    for module in graph:
        visit(module, [module])
    assert {"schema", "tasks"} <= graph["config"] and "strategy" in graph["loop"]  # the test sees imports
