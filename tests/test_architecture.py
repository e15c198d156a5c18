"""The shape of the code: no import cycles, small modules, one variant table, ruff-clean and -formatted."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deltalora.generator.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "deltalora"
MAX_LINES = 350


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """deltalora modules imported anywhere in the file (function-level imports included: they hide cycles)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out |= {n for n in names if n in known}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycles():
    mods = modules()
    graph = {m: imports(p, set(mods)) - {m} for m, p in mods.items()}
    assert sum(map(len, graph.values())) > 50, "the import graph was not read"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_over_the_line_limit():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def variant_comparisons(path: Path) -> list[int]:
    """Lines where a variant name is compared with something (``== "dnd"``, ``in ("A2", "B")``)."""
    names = set(VARIANTS)
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            consts = [e for o in operands for e in ([o] if isinstance(o, ast.Constant) else getattr(o, "elts", []))]
            if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                hits.append(node.lineno)
    return hits


def test_no_branching_on_variant_identity_outside_the_table():
    table = PACKAGE / "generator" / "variants.py"
    found = {
        str(p.relative_to(SRC)): lines
        for p in PACKAGE.rglob("*.py")
        if p != table and (lines := variant_comparisons(p))
    }
    assert not found, f"code outside the variant table compares variant names: {found}"


def test_the_variant_check_sees_a_comparison(tmp_path):
    f = tmp_path / "x.py"
    f.write_text('if cfg.variant in ("A2", "B"):\n    pass\nif v == "dnd":\n    pass\nlabels = ("dnd",)\n')
    assert variant_comparisons(f) == [1, 3]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(args):
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    res = subprocess.run([ruff, *args, "src", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]


def test_architecture_doc_names_every_package():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for pkg in sorted(p.parent for p in PACKAGE.rglob("__init__.py")):
        rel = pkg.relative_to(PACKAGE).as_posix()
        assert rel == "." or f"{rel}/" in doc, f"docs/architecture.md does not describe deltalora/{rel}/"
    for mod in sorted(PACKAGE.rglob("*.py")):
        if mod.name != "__init__.py":
            assert mod.name in doc, f"docs/architecture.md does not list {mod.relative_to(PACKAGE)}"
