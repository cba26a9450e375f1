"""The house rule that every import runs one way: the import graph of `ethos/`, read with `ast` (imports inside
functions included, so a cycle cannot hide behind a function-level import), has no cycle."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "ethos"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The ethos modules `name` imports anywhere in its file: `import a.b`, `from a import b` (b a module or a
    name in a), relative imports resolved."""
    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for dotted in names:
            if dotted == "ethos" or dotted.startswith("ethos."):
                target = resolve(dotted)
                if target and target != name:
                    found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_cycle_finder_finds_cycles():  # the check itself can fail
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_inside_functions_are_seen(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from ethos.x import y\n    import ethos.z\n")
    known = {"ethos.x": None, "ethos.z": None, "ethos.m": None}
    assert imports("ethos.m", tmp_path / "m.py", known) == {"ethos.x", "ethos.z"}


def test_the_import_graph_has_no_cycles():
    g = graph()
    assert len(g) > 50 and "ethos.cli" in g and "ethos.fit" in g["ethos.study"]
    assert cycles(g) == []


def test_nothing_imports_the_entry_point():
    g = graph()
    assert [m for m, deps in g.items() if "ethos.cli" in deps] == []
