"""Imports inside ``rldiff`` point one way: the module graph has no cycle.

Every ``rldiff/**/*.py`` is parsed with ``ast`` (nothing is imported); every import of an
``rldiff`` module counts, at module level or inside a function, absolute or relative. An import
of a name from a package (``from rldiff.serving import app``) counts as an import of the
submodule when there is one, else of the package.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rldiff"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The ``rldiff`` modules one import statement of module ``name`` refers to."""
    if isinstance(node, ast.Import):
        targets = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the module's package, one level up per extra dot
            package = name.split(".") if is_package else name.split(".")[:-1]
            base = package[: len(package) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        targets = {f"{source}.{alias.name}" for alias in node.names}
        targets = {t if t in modules else source for t in targets}
    else:
        return set()
    found = set()
    for target in targets:
        while target and target not in modules:  # ``import rldiff.a.b`` names a module or above
            target = target.rpartition(".")[0]
        if target:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``rldiff`` modules it imports (itself left out)."""
    paths = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    modules = set(paths)
    graph = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(tree):
            edges |= imported(node, name, is_package, modules)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its first module) through every strongly connected
    component of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    previous, frontier = {}, [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle in the component {sorted(component)}")


def test_the_checker_sees_every_kind_of_import():
    modules = {"rldiff", "rldiff.a", "rldiff.pkg", "rldiff.pkg.b", "rldiff.pkg.c"}
    cases = {
        "import rldiff.a": {"rldiff.a"},
        "import rldiff.pkg.b as b": {"rldiff.pkg.b"},
        "from rldiff.a import thing": {"rldiff.a"},
        "from rldiff.pkg import b, thing": {"rldiff.pkg.b", "rldiff.pkg"},
        "from . import b": {"rldiff.pkg.b"},
        "from .c import thing": {"rldiff.pkg.c"},
        "from .. import a": {"rldiff.a"},
        "def f():\n    from rldiff.a import thing": {"rldiff.a"},
        "import numpy": set(),
    }
    for source, expected in cases.items():
        found = set()
        for node in ast.walk(ast.parse(source)):
            found |= imported(node, "rldiff.pkg.c", False, modules)
        assert found == expected, source
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_rldiff_has_no_import_cycle():
    graph = import_graph()
    assert "rldiff.evaluation.protocol" in graph and len(graph) > 30  # the walk found the package
    found = cycles(graph)
    assert not found, "import cycles inside rldiff:\n" + "\n".join(" -> ".join(c) for c in found)
