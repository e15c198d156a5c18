"""The shape of the code: no import cycles, small modules, one variant table, tensors made on their device,
ruff-clean and -formatted."""

from __future__ import annotations

import ast
import re
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


# ---------------------------------------------------------------- tensors made on their device

FACTORIES = frozenset(
    "zeros ones empty full arange range randn rand randint randperm tensor as_tensor eye linspace logspace".split()
)
"""``torch.<name>(...)`` calls that make a tensor on the default device (the CPU) unless given ``device=``."""
DEVICE_TYPES = re.compile(r"\b(Module|Tensor|PeftModel|PreTrainedModel|\w+ForCausalLM)\b")
"""Parameter annotations whose value carries a device (a module's parameters, a tensor's ``.device``)."""
MARKER = re.compile(r"#\s*device:\s*cpu\s+-\s+\S+(\s+\S+){2,}")
"""``# device: cpu - <a reason of three or more words>``, on the call's line or the line above it."""


def device_in_scope(fn: ast.FunctionDef | ast.AsyncFunctionDef, cls: ast.ClassDef | None) -> bool:
    """A device is in scope in a function that has a parameter or local variable named ``device``, a parameter
    annotated with a module or tensor type (``DEVICE_TYPES``), or that is a method of an ``nn.Module`` subclass
    other than ``__init__`` (modules are built on the CPU and moved; their other methods run where they are).
    A nested function inherits its enclosing function's scope."""
    a = fn.args
    params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(x for x in (a.vararg, a.kwarg) if x)]
    if any(p.arg == "device" for p in params):
        return True
    if any(p.annotation is not None and DEVICE_TYPES.search(ast.unparse(p.annotation)) for p in params):
        return True
    if any(isinstance(n, ast.Name) and n.id == "device" and isinstance(n.ctx, ast.Store) for n in ast.walk(fn)):
        return True
    return cls is not None and fn.name != "__init__" and any("Module" in ast.unparse(b) for b in cls.bases)


def factories_without_device(source: str) -> list[int]:
    """Lines of ``torch.<factory>(...)`` calls without ``device=`` where a device is in scope and no marker says
    the CPU is meant."""
    lines = source.splitlines()
    hits: list[int] = []

    def marked(lineno: int) -> bool:
        return any(MARKER.search(lines[i - 1]) for i in (lineno, lineno - 1) if i >= 1)

    def calls(node: ast.AST):  # this function's own calls, not those of the functions defined in it
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            if isinstance(child, ast.Call):
                yield child
            yield from calls(child)

    def visit(node: ast.AST, cls: ast.ClassDef | None, scoped: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, child, False)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = scoped or device_in_scope(child, cls)
                if inner:
                    for call in calls(child):
                        f = call.func
                        if (
                            isinstance(f, ast.Attribute)
                            and isinstance(f.value, ast.Name)
                            and f.value.id == "torch"
                            and f.attr in FACTORIES
                            and not any(k.arg == "device" for k in call.keywords)
                            and not marked(call.lineno)
                        ):
                            hits.append(call.lineno)
                visit(child, None, inner)

    visit(ast.parse(source), None, False)
    return sorted(hits)


def test_tensors_are_made_on_the_device_in_scope():
    found = {
        str(p.relative_to(SRC)): lines
        for p in sorted(PACKAGE.rglob("*.py"))
        if (lines := factories_without_device(p.read_text()))
    }
    assert not found, (
        "tensor factories without device= where a device is in scope (give device=, or mark an intended CPU "
        f"tensor with '# device: cpu - <reason>'): {found}"
    )


def test_the_device_lint_sees_a_factory_without_device():
    src = """
import torch
from torch import nn

def pad(seqs):
    return torch.zeros(3)                      # no device in scope: the CPU is the caller's business

def loss(model: torch.nn.Module, x):
    return torch.zeros(())                     # 9: flagged

def moved(x: torch.Tensor):
    a = torch.arange(3, device=x.device)
    c = torch.ones(2)  # device: cpu
    b = torch.randn(3, generator=None)  # device: cpu - seeded noise from a CPU generator
    return a, b, c                             # 13 (above): a marker without a reason is no marker

def outer(device):
    def inner():
        return torch.full((2,), 1.0)           # 19: nested, inherits the scope
    return inner

class Net(nn.Module):
    def __init__(self):
        self.b = nn.Parameter(torch.zeros(3))  # built on the CPU, then moved
    def forward(self, x):
        return x + torch.eye(3)                # 26: flagged
"""
    assert factories_without_device(src) == [9, 13, 19, 26]


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


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_committed_cells_keep_their_delta_and_weights_stay_out_of_git():
    """The δ beside a committed cell record is committed (a fresh machine rebuilds the behaviour tables from it);
    any other safetensors file (adapters, generators) stays ignored."""

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert not ignored("results/experiments_x/cells/cv__dnd__fold_0_/seed0.delta.safetensors")
    assert ignored("results/experiments_x/adapter_model.safetensors") and ignored("workspace/g/generator.safetensors")
