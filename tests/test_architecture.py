"""The house by stage (docs/ARCHITECTURE.md): imports run down the floors, never up and never in
a circle; a stage never imports another stage; no method imports another method; modules stay
small enough to read. Imports inside functions count (a lazy import is still an arrow)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mka_exp"
# Floor of each module (longest matching prefix wins). An import may go to the same floor or a
# lower one. Kept in step with docs/ARCHITECTURE.md.
FLOORS = {
    "mka_exp": 0,
    "mka_exp.checks": 0,
    "mka_exp.choices": 0,
    "mka_exp.contracts": 0,
    "mka_exp.resolvers": 0,
    "mka_exp.shims": 1,
    "mka_exp.data": 1,
    "mka_exp.layers": 1,
    "mka_exp.hooks": 1,
    "mka_exp.manifold": 1,
    "mka_exp.state_store": 1,
    "mka_exp.activations": 2,
    "mka_exp.calibration": 2,
    "mka_exp.fingerprints": 2,
    "mka_exp.models": 2,
    "mka_exp.methods": 3,
    "mka_exp.repair": 3,
    "mka_exp.quantizers": 3,
    "mka_exp.evaluation": 3,
    "mka_exp.tracking": 4,
    "mka_exp.results": 4,
    "mka_exp.job": 4,
    "mka_exp.runtime": 4,
    "mka_exp.canonical": 5,
    "mka_exp.pipeline": 5,
    "mka_exp.preflight": 5,
    "mka_exp.resume": 5,
    "mka_exp.seed_cache": 5,
    "mka_exp.sweep": 6,
    "mka_exp.report": 7,
}
STAGES = ("mka_exp.methods", "mka_exp.repair", "mka_exp.quantizers", "mka_exp.evaluation")
SHARED_IN_METHODS = ("mka_exp.methods", "mka_exp.methods.base", "mka_exp.methods.registry")
MAX_LINES = 450
WHOLE = {"mka_exp.manifold"}  # one job (the paper's similarity measures), may stay whole


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines under `if TYPE_CHECKING:` (annotations only, never executed)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines |= set(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The mka_exp modules `name` imports, anywhere in its file."""
    tree = ast.parse(path.read_text())
    skip = type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1],
                                 *([base] if base else [])])  # fmt: skip
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                      for a in node.names}  # fmt: skip
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def floor(name: str) -> int:
    prefix = max((p for p in FLOORS if name == p or name.startswith(p + ".")), key=len)
    return FLOORS[prefix]


def room(name: str, rooms: tuple[str, ...]) -> str | None:
    return next((r for r in rooms if name == r or name.startswith(r + ".")), None)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_reader_sees_lazy_and_relative_imports(tmp_path):
    """The checks below would pass vacuously if the reader missed imports: prove it does not."""
    edges = graph()
    assert "mka_exp.layers" in edges["mka_exp.methods.mka"]
    assert "mka_exp.models.saving" in edges["mka_exp.pipeline"]  # imported inside a function
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from mka_exp import layers\n")
    assert imported("mka_exp.x", src, {"mka_exp.layers"}) == {"mka_exp.layers"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert cycles(graph()) == []


def test_every_module_has_a_floor_and_no_arrow_runs_back_up():
    edges = graph()
    up = [f"{a} ({floor(a)}) -> {b} ({floor(b)})" for a, bs in edges.items() for b in bs
          if floor(b) > floor(a)]  # fmt: skip
    assert up == []


def test_a_stage_never_imports_another_stage():
    edges = graph()
    crossing = [f"{a} -> {b}" for a, bs in edges.items() for b in bs
                if room(a, STAGES) and room(b, STAGES) and room(a, STAGES) != room(b, STAGES)]  # fmt: skip
    assert crossing == []


def test_no_method_imports_another_method():
    edges = graph()
    methods = [m for m in edges if m.startswith("mka_exp.methods.") and m not in SHARED_IN_METHODS]
    bad = [f"{a} -> {b}" for a in methods for b in edges[a] if b in methods]
    assert bad == []


def test_nothing_outside_the_report_imports_it():
    edges = graph()
    bad = [f"{a} -> {b}" for a, bs in edges.items() for b in bs
           if b.startswith("mka_exp.report") and not a.startswith("mka_exp.report")]  # fmt: skip
    assert bad == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_size(name):
    if name.startswith("mka_exp.report") or name in WHOLE:
        return
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines; split it by job"


def test_every_package_says_what_it_owns_and_may_import():
    for init in sorted(PACKAGE.rglob("__init__.py")):
        if init.parent == PACKAGE:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert re.search(r"[Mm]ay import|Floor \d", doc), (
            f"{init}: say its floor / what it may import"
        )
