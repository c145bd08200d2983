"""Imports only point down (``tools -> train -> pipelines / model``), and no module imports
itself back through others. Imports inside functions count: hiding a dependency there
does not remove it.

The checker is first run on a small synthetic tree with a known upward import and a
known cycle, so that a checker that finds nothing cannot pass by accident.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Lower layers may not import higher ones; packages of one layer may not import each other.
LAYERS = {"pipelines": 0, "model": 0, "configs": 0, "train": 1, "tools": 2}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(root: Path, path: Path, modules: set[str]) -> set[str]:
    """The project modules that ``path`` imports anywhere in its body, as dotted names
    (``from a.b import c`` is module ``a.b.c`` when that is a module, else ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] in LAYERS}
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    files = [p for top in LAYERS for p in (root / top).rglob("*.py")] if root.is_dir() else []
    modules = {module_name(root, p) for p in files}
    return {module_name(root, p): project_imports(root, p, modules) for p in files}


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, imported in graph.items():
        top = module.split(".")[0]
        for target in sorted(imported):
            other = target.split(".")[0]
            if other != top and LAYERS[other] >= LAYERS[top]:
                out.append(f"{module} imports {target}")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_checker_finds_an_upward_import_and_a_cycle(tmp_path):
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "tools").mkdir()
    (tmp_path / "pipelines" / "a.py").write_text("def f():\n    from tools import cli\n")
    (tmp_path / "pipelines" / "b.py").write_text("from pipelines.c import x\n")
    (tmp_path / "pipelines" / "c.py").write_text("import pipelines.b\n")
    (tmp_path / "tools" / "cli.py").write_text("from pipelines import a\n")
    graph = import_graph(tmp_path)
    assert layering_violations(graph) == ["pipelines.a imports tools.cli"]
    assert sorted(map(tuple, cycles(graph))) == [("pipelines.a", "tools.cli"), ("pipelines.b", "pipelines.c")]


def test_imports_only_point_down():
    assert layering_violations(import_graph(REPO)) == []


def test_no_import_cycles():
    assert cycles(import_graph(REPO)) == []


def test_readme_layout_names_every_module():
    """README's layout table lists every module of the packages (by file name, in the row of its package)."""
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    rows = {line.split("|")[1].strip(" `/"): line for line in layout.splitlines() if line.startswith("| `")}
    missing = []
    for top in ("pipelines", "train", "tools"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO / top)
            if path.name == "__init__.py" or (rel.parts[0] == "convert" and top == "tools"):
                continue
            if path.stem not in rows[top]:
                missing.append(f"{top}/{rel}")
    assert missing == []
