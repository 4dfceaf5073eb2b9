"""The project's modules form layers: no module imports one that imports it back (directly or through
others), and every project module is imported at the top of the file that uses it, so the import lines
at the top of each file are its whole list of dependencies."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULES = {p.stem for p in REPO.glob("*.py")}


def project_imports(path: Path) -> tuple[set[str], set[str]]:
    """(project modules imported at the top level, those imported inside functions)."""
    tree = ast.parse(path.read_text())
    top, inner = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = {(node.module or "").split(".")[0]}
        else:
            continue
        (top if node in tree.body else inner).update(names & MODULES)
    return top, inner


def import_graph() -> dict[str, set[str]]:
    return {name: project_imports(REPO / f"{name}.py")[0] for name in sorted(MODULES)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports as a list of module names, or None (depth-first search)."""
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for dependency in sorted(graph[name]):
            cycle = visit(dependency)
            if cycle:
                return cycle
        path.pop()
        done.add(name)
        return None

    return next((cycle for name in graph if (cycle := visit(name))), None)


def test_the_modules_import_each_other_without_a_cycle():
    assert find_cycle(import_graph()) is None, find_cycle(import_graph())


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_project_modules_are_imported_at_the_top():
    late = {name: project_imports(REPO / f"{name}.py")[1] for name in MODULES}
    assert {name: found for name, found in late.items() if found} == {}


def test_metric_names_are_a_leaf():
    assert import_graph()["metric_names"] == set()
    assert "eval" not in import_graph()["reporting"]
