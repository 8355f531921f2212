"""The package's layers point one way: a module imports only from its own layer or the layers
below it, at run time (``if TYPE_CHECKING:`` imports are for type checkers only), and no modules
import each other in a cycle. The import graph is read from the source, every import statement at
any depth of a module included (a function-level import runs too)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import segkit

PACKAGE = Path(segkit.__file__).parent
#: Bottom to top. A module belongs to the first prefix it starts with; each may import from its own
#: layer and from the layers before it. data and models are one level: they import nothing of each other.
LAYERS: list[tuple[str, ...]] = [
    ("segkit.errors", "segkit.files", "segkit.distributed", "segkit.records", "segkit.download", "segkit.heap"),
    ("segkit.data",),
    ("segkit.models",),
    ("segkit.settings",),
    ("segkit.checkpoints",),
    ("segkit.inference",),
    ("segkit.evaluation",),
    ("segkit.training",),
    ("segkit.config", "segkit.reporting", "segkit.launch", "segkit.cli"),
]
#: Pairs on one level that must not import each other at all.
INDEPENDENT = [("segkit.data", "segkit.models")]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(path: Path, module: str) -> set[str]:
    """The segkit modules ``module`` imports when it runs (``from segkit import x`` resolves to the
    submodule ``segkit.x`` where there is one)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "segkit")
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0 \
                    and child.module.split(".")[0] == "segkit":
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    found.add(sub if sub in MODULES else child.module)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(module)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts}
#: The root package's lazy ``segkit.Predictor`` (a module ``__getattr__``) is the public facade,
#: the one import allowed to reach up; ``from segkit import __version__`` reads only the root.
FACADE = {("segkit", "segkit.inference")}
GRAPH = {m: runtime_imports(p, m) for m, p in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        if module != "segkit":
            layer_of(module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "segkit"))
def test_no_upward_import(module: str) -> None:
    upward = sorted(t for t in GRAPH[module] if t != "segkit" and layer_of(t) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports a higher layer: {upward}"


def test_root_imports_only_its_facade() -> None:
    assert {("segkit", ".".join(t.split(".")[:2])) for t in GRAPH["segkit"]} <= FACADE


@pytest.mark.parametrize("low,high", INDEPENDENT)
def test_independent_packages(low: str, high: str) -> None:
    for a, b in ((low, high), (high, low)):
        crossing = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if m.startswith(a)
                          for t in targets if t.startswith(b))
        assert not crossing, crossing


def test_no_import_cycle() -> None:
    """Depth-first search for a back edge among the run-time imports (the root package's facade
    aside), naming the cycle when there is one."""
    graph = {m: {t for t in targets if t in MODULES and t != "segkit"} for m, targets in GRAPH.items() if m != "segkit"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_upward_and_cyclic_imports(tmp_path: Path) -> None:
    """The reader finds function-level imports, skips TYPE_CHECKING ones, and the ranks order as meant."""
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from segkit.cli import x\n"
                      "def f():\n    from segkit.training import trainer\n"
                      "    from segkit.inference.multiscale import y\n")
    assert runtime_imports(source, "segkit.models.m") == {"segkit.training.trainer", "segkit.inference.multiscale"}
    assert layer_of("segkit.training.trainer") > layer_of("segkit.models.heads")
