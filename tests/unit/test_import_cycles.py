"""No import circle among the product's modules (issue 20: "no import circle").

import-linter checks the direction between rooms and layers (pyproject.toml); this test checks what it
does not: that no two modules import each other, directly or around a ring, also inside one room. Every
import counts, the ones inside functions too, so a circle cannot be hidden by moving an import into a
function. Only a ``if __name__ == "__main__":`` block is left out: run so, a file is the module
``__main__``, which no other module imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("stablealign", "services", "stablealign_app")
GENERATED = "stablealign.v1"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = _module_name(path)
            if not name.startswith(GENERATED):
                found[name] = path
    return found


def _is_main_block(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _imported(tree: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The product modules ``module`` imports anywhere in its body (``__main__`` blocks left out)."""
    out: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_main_block(node):
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*parent, base] if base else parent)
            # ``from package import module`` imports that module; ``from module import name`` the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out.update(target for target in targets if target in known and target != module)
    return out


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imported(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
            for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each one circle or more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_scan_sees_the_library_and_its_imports():
    graph = import_graph()
    assert {"stablealign.nats.client", "stablealign.serving.service", "services.world.main",
            "stablealign_app.cli.main", "stablealign.training.train"} <= graph.keys()
    assert "stablealign.nats.client" in graph["stablealign.serving.service"]
    # An import inside a function counts (the framework closes the LLM clients from one).
    assert "stablealign.llm.backends" in graph["stablealign.serving.service"]


def test_the_cycle_finder_finds_a_ring():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_product_modules():
    assert cycles(import_graph()) == []
