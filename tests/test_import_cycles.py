"""The package's modules import one another without cycles, lazy imports included.

Every module of python/neural_mechanics is read with ``ast`` (nothing is imported). An edge
A → B is any package-internal import in A that makes B run: module-level imports, the lazy
imports inside functions, relative and absolute, and the names of the PEP 562 ``_LAZY`` table of
a package's ``__init__``. Resolution:

- ``import p.a.b`` and ``from .b import c``: an edge to the module (``p.a.b``, ``.b``); a package
  stands for its ``__init__``. Parent packages that are not the importer's own ancestors are
  edges too (importing ``p.a.b`` from outside ``p.a`` runs ``p/a/__init__``).
- ``from . import x`` / ``from .b import x``: an edge to submodule ``x`` when it is one, else to
  the package or module the name is read from. The importer's own ancestor packages are already
  being imported when it runs, so ``from .. import submodule`` is no edge to them.
- Imports under ``if TYPE_CHECKING:`` never run and are not edges.

A cycle is a strongly connected component of that graph; the test prints one concrete loop of
each, with the file and line of every import in it.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "neural_mechanics"
# Longest first: ".cpython-311-x86_64-linux-gnu.so" before ".so".
_SUFFIXES = sorted({".py", ".pyi", *importlib.machinery.EXTENSION_SUFFIXES}, key=len, reverse=True)


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: Path
    line: int
    how: str  # "import", "lazy import" (inside a function) or "_LAZY"

    def where(self) -> str:
        return f"{self.path.name}:{self.line}, {self.how}"


def modules(root: Path) -> dict[str, Path | None]:
    """Dotted name → Python source of every module of the package at ``root`` (None for a
    compiled module such as ``_native``: a leaf, known so that ``from . import _native`` resolves)."""
    found: dict[str, Path | None] = {}
    for path in sorted(root.rglob("*")):
        suffix = next((s for s in _SUFFIXES if path.name.endswith(s)), None)
        if suffix is None or not path.is_file() or "__pycache__" in path.parts:
            continue
        parts = [*path.relative_to(root.parent).parts[:-1], path.name[: -len(suffix)]]
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if suffix == ".py":
            found[name] = path
        else:
            found.setdefault(name, None)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _ancestors(name: str) -> set[str]:
    """The module itself and every package above it."""
    parts = name.split(".")
    return {".".join(parts[:k]) for k in range(1, len(parts) + 1)}


class _Imports(ast.NodeVisitor):
    def __init__(self, name: str, path: Path, known: dict[str, Path | None]):
        self.name, self.path, self.known = name, path, known
        self.package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        self.own = _ancestors(name)
        self.depth = 0
        self.edges: list[Edge] = []

    def _add(self, target: str, node: ast.AST, how: str | None = None) -> None:
        if target in self.known and target != self.name:
            how = how or ("lazy import" if self.depth else "import")
            self.edges.append(Edge(self.name, target, self.path, getattr(node, "lineno", 0), how))

    def _add_parents(self, module: str, node: ast.AST) -> None:
        """Packages above ``module`` that importing it runs (those not already being imported)."""
        for parent in _ancestors(module) - {module} - self.own:
            self._add(parent, node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self.visit_FunctionDef(node)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)
            self._add_parents(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), self.package)
        else:
            base = node.module or ""
        self._add_parents(base, node)
        if base not in self.own:
            self._add(base, node)  # runs base (a module, or a package's __init__)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in self.known:
                self._add(sub, node)
            else:
                self._add(base, node)  # a name read from base: base must have run

    def visit_Assign(self, node: ast.Assign) -> None:
        targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        self._lazy_table(targets, node.value, node)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if isinstance(node.target, ast.Name) and node.value is not None:
            self._lazy_table([node.target.id], node.value, node)
        self.generic_visit(node)

    def _lazy_table(self, targets: list[str], value: ast.expr, node: ast.AST) -> None:
        """PEP 562: ``_LAZY = {"name": ".module", ...}`` of a package's __init__."""
        if "_LAZY" not in targets or self.depth or not isinstance(value, ast.Dict):
            return
        for v in value.values:
            if isinstance(v, ast.Constant) and isinstance(v.value, str):
                target = importlib.util.resolve_name(v.value, self.package)
                self._add(target, v, "_LAZY")
                self._add_parents(target, v)


def import_graph(root: Path) -> dict[str, list[Edge]]:
    """Module → its package-internal import edges, for the package at ``root``."""
    known = modules(root)
    graph: dict[str, list[Edge]] = {}
    for name, path in known.items():
        if path is None:
            graph[name] = []
            continue
        visitor = _Imports(name, path, known)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        graph[name] = visitor.edges
    return graph


def _components(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Strongly connected components (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph[v]:
            w = e.target
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def cycles(graph: dict[str, list[Edge]]) -> list[list[Edge]]:
    """One shortest loop of edges through the first module of every component of more than one module."""
    loops = []
    for comp in _components(graph):
        if len(comp) < 2:
            continue
        members, start = set(comp), comp[0]
        came: dict[str, Edge] = {}
        queue = deque([start])
        while queue:
            v = queue.popleft()
            for e in graph[v]:
                if e.target == start:
                    loop = [e]
                    while loop[0].source != start:
                        loop.insert(0, came[loop[0].source])
                    loops.append(loop)
                    queue.clear()
                    break
                if e.target in members and e.target not in came and e.target != start:
                    came[e.target] = e
                    queue.append(e.target)
    return loops


def describe(loop: list[Edge]) -> str:
    return loop[0].source + "".join(f"\n    -> {e.target}   ({e.where()})" for e in loop)


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "neural_mechanics.run" in graph and "neural_mechanics.tracking.tracker" in graph
    found = cycles(graph)
    tangled = [c for c in _components(graph) if len(c) > 1]
    if found:
        pytest.fail(
            "import cycles (module-level and lazy imports alike):\n"
            + "\n".join(describe(c) for c in found)
            + "\nmodules tangled together: "
            + "; ".join(", ".join(c) for c in tangled),
            pytrace=False,
        )


def test_rendering_sits_above_analysis():
    """The one lazy upward edge (Run.plot → plots) is allowed only because plots and equilibrium
    never import run; report imports both and nothing imports report."""
    graph = import_graph(PACKAGE)
    targets = {m: {e.target for e in edges} for m, edges in graph.items()}
    for low in ("neural_mechanics.equilibrium", "neural_mechanics.plots"):
        assert not targets[low] & {"neural_mechanics.run", "neural_mechanics.report"}, low
    assert {e.target for e in graph["neural_mechanics.run"] if e.how == "import"}.isdisjoint({"neural_mechanics.plots", "neural_mechanics.report"})
    importers = [m for m, t in targets.items() if "neural_mechanics.report" in t]
    assert importers == ["neural_mechanics.cli"], f"only the command line imports report, not {importers}"


# -- the walker itself, on tiny packages written to tmp_path -----------------------------------------


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def _pairs(graph: dict[str, list[Edge]]) -> set[tuple[str, str, str]]:
    return {(e.source, e.target, e.how) for edges in graph.values() for e in edges}


def test_walker_finds_a_cycle_through_a_lazy_import(tmp_path):
    pkg = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import g\n\ndef f():\n    return g()\n",
        "pkg/b.py": "def g():\n    from . import a  # lazy, but a cycle all the same\n    return a\n",
        "pkg/c.py": "import pkg.a\n",
    })  # fmt: skip
    found = cycles(import_graph(pkg))
    assert len(found) == 1
    assert [(e.source, e.target, e.how) for e in found[0]] == [("pkg.a", "pkg.b", "import"), ("pkg.b", "pkg.a", "lazy import")]
    assert "b.py:2, lazy import" in describe(found[0])


def test_walker_finds_a_cycle_through_the_lazy_table(tmp_path):
    pkg = _package(tmp_path, {
        "pkg/__init__.py": '_LAZY = {"thing": ".sub"}\nhelper = 1\n',
        "pkg/sub/__init__.py": "from .mod import thing\n",
        "pkg/sub/mod.py": "from .. import helper  # a name of pkg/__init__: an edge to it\nthing = helper\n",
    })  # fmt: skip
    found = cycles(import_graph(pkg))
    assert [[e.target for e in loop] for loop in found] == [["pkg.sub", "pkg.sub.mod", "pkg"]]
    assert found[0][0].how == "_LAZY"


def test_walker_resolves_every_import_form(tmp_path):
    pkg = _package(tmp_path, {
        "pkg/__init__.py": 'from . import errors\n_LAZY = {"x": ".lazy_mod"}\n',
        "pkg/errors.py": "import numpy\n",
        "pkg/_native.abi3.so": "",
        "pkg/lazy_mod.py": "import pkg.sub.leaf\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/leaf.py": (
            "from typing import TYPE_CHECKING\n"
            "from .. import _native, errors  # submodules of an ancestor: no edge to pkg itself\n"
            "from ..errors import E\n"
            "from . import other\n"
            "if TYPE_CHECKING:\n"
            "    from ..lazy_mod import T  # never runs\n"
            "def f():\n"
            "    from pkg.deep.inner import g\n"
        ),
        "pkg/sub/other.py": "",
        "pkg/deep/__init__.py": "",
        "pkg/deep/inner.py": "",
    })  # fmt: skip
    graph = import_graph(pkg)
    assert graph["pkg._native"] == []
    assert _pairs(graph) == {
        ("pkg", "pkg.errors", "import"),
        ("pkg", "pkg.lazy_mod", "_LAZY"),
        ("pkg.lazy_mod", "pkg.sub.leaf", "import"),
        ("pkg.lazy_mod", "pkg.sub", "import"),  # importing pkg.sub.leaf runs pkg/sub/__init__
        ("pkg.sub.leaf", "pkg._native", "import"),
        ("pkg.sub.leaf", "pkg.errors", "import"),
        ("pkg.sub.leaf", "pkg.sub.other", "import"),
        ("pkg.sub.leaf", "pkg.deep.inner", "lazy import"),
        ("pkg.sub.leaf", "pkg.deep", "lazy import"),  # a subpackage: its __init__
    }
    assert cycles(graph) == []


@pytest.mark.parametrize("form", ["import pkg.a", "from pkg import a", "from . import a", "from .a import f", "from pkg.a import f"])
def test_walker_sees_each_form_of_a_back_edge(tmp_path, form):
    pkg = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\ndef f():\n    pass\n",
        "pkg/b.py": f"def g():\n    {form}\n",
    })  # fmt: skip
    assert len(cycles(import_graph(pkg))) == 1
