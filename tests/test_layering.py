"""The package's import layering, as docs/architecture.md writes it, holds for every module.

The rule is read from the ``layers`` block of docs/architecture.md: each line is a layer, later
lines may import earlier ones; names on one line separated by ``|`` are peers that may not import
each other. Every ``import`` in every module counts, including imports inside functions, so a lazy
import cannot hide a cycle. The only allowed exception is listed in the doc's ``exceptions`` block.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"


def read_rule(doc: Path) -> tuple[list[list[list[str]]], set[tuple[str, str]], list[tuple[list[str], str]]]:
    """(layers: per line, per peer group, the module prefixes; allowed (importer, imported) edges;
    forbidden (importers, imported) prefixes)."""
    text = doc.read_text()
    layers_block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert layers_block, f"{doc}: no ```layers block"
    layers = [[group.split() for group in line.split("|")] for line in layers_block[1].splitlines() if line.strip()]
    exc_block = re.search(r"```exceptions\n(.*?)```", text, re.S)
    allowed = set()
    for line in exc_block[1].splitlines() if exc_block else []:
        if "->" in line:
            a, b = (s.strip() for s in line.split("->"))
            allowed.add((a, b))
    forbidden_block = re.search(r"```forbidden\n(.*?)```", text, re.S)
    forbidden = []
    for line in forbidden_block[1].splitlines() if forbidden_block else []:
        if "->" in line:
            a, b = line.split("->")
            forbidden.append((a.split(), b.strip()))
    return layers, allowed, forbidden


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, src: Path) -> set[str]:
    """Every usae module ``path`` imports (absolute or relative, at any depth of the file)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "usae"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.split(".")[0] != "usae":
                continue
            for a in node.names:  # "from usae.model import sae" imports the module usae.model.sae
                sub = src / f"{base}.{a.name}".replace(".", "/")
                out.add(f"{base}.{a.name}" if sub.is_dir() or sub.with_suffix(".py").is_file() else base)
    return out


def place(module: str, layers: list[list[list[str]]]) -> tuple[int, int] | None:
    """(layer, peer group) of the longest listed prefix of ``module``; ``usae`` alone matches only itself."""
    best, where = -1, None
    for i, line in enumerate(layers):
        for g, group in enumerate(line):
            for prefix in group:
                hit = module == prefix or (prefix != "usae" and under(module, prefix))
                if hit and len(prefix) > best:
                    best, where = len(prefix), (i, g)
    return where


def violations(src: Path, doc: Path) -> list[str]:
    layers, allowed, forbidden = read_rule(doc)
    graph: dict[str, set[str]] = {}
    problems = []
    for path in sorted((src / "usae").rglob("*.py")):
        name = module_name(path, src)
        graph[name] = imports_of(path, name, src)
    for name, deps in graph.items():
        here = place(name, layers)
        if here is None:
            problems.append(f"{name}: not placed in any layer of {doc.name}")
            continue
        for dep in sorted(deps):
            there = place(dep, layers)
            if (name, dep) in allowed or there is None or dep == name:
                continue
            banned = any(under(dep, b) and any(under(name, a) for a in importers) for importers, b in forbidden)
            if banned or there[0] > here[0] or (there[0] == here[0] and there[1] != here[1]):
                problems.append(f"{name} imports {dep}: breaks the layering")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph, allowed)]
    return problems


def cycles(graph: dict[str, set[str]], allowed: set[tuple[str, str]]) -> list[list[str]]:
    """Import cycles between modules (an imported package counts as its __init__ module)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if (node, dep) in allowed or dep not in graph or dep == node:
                continue
            if state.get(dep) == 1:
                found.append(stack[stack.index(dep) :] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_package_follows_the_documented_layering():
    assert violations(SRC, DOC) == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("model/bad.py", "from usae.training.fit import fit\n", "usae.model.bad imports usae.training.fit"),
        (
            "extraction/bad.py",
            "def f():\n    from usae.training import fit\n",
            "usae.extraction.bad imports usae.training.fit",
        ),
        ("evaluation/bad.py", "import usae.training.step\n", "usae.evaluation.bad imports usae.training.step"),
        ("data/bad.py", "from usae.explorer import concepts\n", "usae.data.bad imports usae.explorer.concepts"),
    ],
)
def test_a_planted_bad_import_fails(tmp_path, module, source, expected):
    tree = tmp_path / "src"
    shutil.copytree(SRC / "usae", tree / "usae", ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "usae" / module).write_text(source)
    assert any(p.startswith(expected) for p in violations(tree, DOC)), violations(tree, DOC)


def test_a_planted_cycle_fails(tmp_path):
    tree = tmp_path / "src"
    shutil.copytree(SRC / "usae", tree / "usae", ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "usae" / "data" / "one.py").write_text("from usae.data import two\n")
    (tree / "usae" / "data" / "two.py").write_text("def f():\n    from usae.data import one\n")
    assert any("cycle" in p and "usae.data.one" in p for p in violations(tree, DOC))
