"""Facts of the house anyone can check from the code, checked on every `make test`: no import circle between the
project's modules (every import counts, lazy ones inside functions included), no file over 600 lines and no class
over 300 lines outside tests/ and bench/."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGES = ("shards", "pipeline", "model", "training", "apps", "bench")
MAX_FILE_LINES, MAX_CLASS_LINES = 600, 300


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the packages and the top-level scripts (train.py)."""
    files = {p.relative_to(root): p for package in PACKAGES for p in (root / package).rglob("*.py")}
    files.update({p.relative_to(root): p for p in root.glob("*.py")})
    out = {}
    for rel, path in files.items():
        parts = rel.with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports. `from a.b import c` names module a.b.c if there is one, else a.b."""
    modules = _modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in map(resolve, targets) if t and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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


def test_cycle_finder_finds_a_planted_circle(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "__init__.py").write_text("")
    (tmp_path / "shards" / "a.py").write_text("from shards.b import f\n")
    (tmp_path / "shards" / "b.py").write_text("def f():\n    from shards import a\n")
    (tmp_path / "shards" / "c.py").write_text("import shards.a\n")
    assert cycles(import_graph(tmp_path)) == [["shards.a", "shards.b"]]


def test_no_import_circle():
    assert cycles(import_graph(REPO_ROOT)) == []


def test_no_file_or_class_over_the_limits():
    too_long = []
    for path in _modules(REPO_ROOT).values():
        if path.relative_to(REPO_ROOT).parts[0] == "bench":
            continue
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(REPO_ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{path.relative_to(REPO_ROOT)}:{node.name}: {node.end_lineno - node.lineno + 1}")
    assert too_long == []
