"""The layering of moezoo.kernels, read from the source with ``ast``: the modules inside the package import one
another without a cycle, and none reaches into another's private (``_name``) parts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import moezoo.kernels

PACKAGE = "moezoo.kernels"
KERNELS_DIR = Path(moezoo.kernels.__file__).parent
MODULES = sorted(path.stem for path in KERNELS_DIR.glob("*.py") if path.stem != "__init__")


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def sibling_of(node: ast.ImportFrom | ast.Import, alias_name: str | None = None) -> str | None:
    """The kernels module an import statement names (``from .plan import x``, ``from moezoo.kernels.plan import
    x``, ``import moezoo.kernels.plan``), or None for anything outside the package (or the package itself)."""
    if isinstance(node, ast.Import):
        dotted = alias_name
    elif node.level == 1:
        dotted = f"{PACKAGE}.{node.module}" if node.module else PACKAGE
    elif node.level == 0:
        dotted = node.module or ""
    else:  # from .. import: outside the package
        return None
    prefix = PACKAGE + "."
    return dotted[len(prefix):].split(".")[0] if dotted.startswith(prefix) else None


class KernelsImports(ast.NodeVisitor):
    """One module's imports of sibling modules (at any depth: top level or inside functions) and its uses of
    their private names (imported by name, or read as an attribute of an imported sibling module)."""

    def __init__(self):
        self.siblings: set[str] = set()
        self.module_aliases: dict[str, str] = {}  # local name -> sibling module it stands for
        self.private_uses: list[str] = []

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            module = sibling_of(node, alias.name)
            if module is not None:
                self.siblings.add(module)
                if alias.asname:  # plain ``import a.b.c`` binds ``a``, not the module
                    self.module_aliases[alias.asname] = module

    def visit_ImportFrom(self, node: ast.ImportFrom):
        module = sibling_of(node)
        if node.level == 1 and node.module is None or module is None and node.module == PACKAGE:
            for alias in node.names:  # from . import plan [as p]: the names are modules
                self.siblings.add(alias.name)
                self.module_aliases[alias.asname or alias.name] = alias.name
            return
        if module is None:
            return
        self.siblings.add(module)
        self.private_uses += [f"{module}.{alias.name}" for alias in node.names if is_private(alias.name)]

    def visit_Attribute(self, node: ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id in self.module_aliases and is_private(node.attr):
            self.private_uses.append(f"{self.module_aliases[node.value.id]}.{node.attr}")
        self.generic_visit(node)


def imports_of(module: str) -> KernelsImports:
    visitor = KernelsImports()
    visitor.visit(ast.parse((KERNELS_DIR / f"{module}.py").read_text(), filename=f"{module}.py"))
    visitor.siblings.discard(module)
    return visitor


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes (first == last), or None: depth-first search that
    keeps the path it is on."""
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for successor in sorted(graph.get(node, ())):
            cycle = walk(successor, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = walk(start, [])
        if cycle:
            return cycle
    return None


def test_find_cycle_and_the_import_reader_on_hand_made_cases():
    """The checks below can fail: a hand-made cycle is found, an acyclic graph is not flagged, and private
    names are seen whether imported by name or read off an imported module."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    source = ("from .plan import DispatchPlan, _hidden\nimport moezoo.kernels.routing as r\nfrom . import losses\n"
              "def f():\n    from .experts import expert_mlp\n    return r._private(losses._secret)\n")
    visitor = KernelsImports()
    visitor.visit(ast.parse(source))
    assert visitor.siblings == {"plan", "routing", "losses", "experts"}
    assert sorted(visitor.private_uses) == ["losses._secret", "plan._hidden", "routing._private"]


def test_kernels_modules_are_found():
    assert {"activations", "cpu_backend", "experts", "plan", "triton_moe"} <= set(MODULES)


def test_no_import_cycle_inside_kernels():
    graph = {module: imports_of(module).siblings for module in MODULES}
    assert find_cycle(graph) is None, f"import cycle inside moezoo.kernels: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("module", MODULES)
def test_no_module_uses_a_private_name_of_another(module):
    assert imports_of(module).private_uses == []


@pytest.mark.parametrize("backend", ["cpu_backend", "triton_moe"])
def test_backends_never_import_the_dispatcher(backend):
    """The backends sit below the public API: they import only the activations, the plan and the native library
    (``cpu_decode``: the torch backend's fused gated-SiLU backward lives there), which imports no sibling."""
    assert imports_of(backend).siblings <= {"activations", "plan", "cpu_decode"}
    assert imports_of("cpu_decode").siblings == set()
