"""The package's shape, checked: every import between lorahpo's modules (top-level AND inside functions) points down
(the import graph has no cycle), no module outgrows 450 lines, and lorahpo's own modules are imported at the top of
a file, never inside a function (where a cycle would hide)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "lorahpo"
MAX_LINES = 450


def modules() -> dict[str, ast.Module]:
    return {f"lorahpo.{p.stem}": ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def lorahpo_imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(imported lorahpo module, line, inside a function?) for every import statement in the tree."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("lorahpo"):
                if child.module == "lorahpo":  # `from lorahpo import sweep`
                    found.extend((f"lorahpo.{a.name}", child.lineno, in_function) for a in child.names)
                else:
                    found.append((child.module, child.lineno, in_function))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("lorahpo."))
            visit(child, inner)

    visit(tree, False)
    return found


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for name, tree in modules().items():
        graph.add_node(name)
        for target, _, _ in lorahpo_imports(tree):
            if target != "lorahpo.__init__":
                graph.add_edge(name, target)
    return graph


def test_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    cycles = list(nx.simple_cycles(graph))
    assert cycles == [], f"import cycles: {cycles}"
    # the foundation imports nothing of lorahpo's above it
    assert set(graph.successors("lorahpo.errors")) == set()
    assert set(graph.successors("lorahpo.config")) <= {"lorahpo.errors", "lorahpo.schema"}
    assert set(graph.successors("lorahpo.storage")) <= {"lorahpo.errors", "lorahpo.config", "lorahpo.schema"}
    # reading and writing results needs no model code (load_experiment in a notebook imports no torch model)
    assert not nx.descendants(graph, "lorahpo.results") & {"lorahpo.model", "lorahpo.module", "lorahpo.trainable"}


def test_cycle_detector_finds_a_cycle() -> None:
    """The check above can fail: a function-level import back up the graph is a cycle it reports."""
    tree = ast.parse("def f():\n    from lorahpo.sweep import run\n")
    assert lorahpo_imports(tree) == [("lorahpo.sweep", 2, True)]
    graph = import_graph()
    graph.add_edge("lorahpo.config", "lorahpo.sweep")
    assert list(nx.simple_cycles(graph))


def test_no_lorahpo_import_inside_a_function() -> None:
    inside = [
        (name, line, target) for name, tree in modules().items() for target, line, f in lorahpo_imports(tree) if f
    ]
    assert inside == []


def test_no_module_over_450_lines() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}
