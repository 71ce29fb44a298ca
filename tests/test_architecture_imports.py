"""Architecture: the package's module-level import graph has no cycle, and imports sit at the top of files.

The graph is built from the source (``ast``), not by importing: an edge ``a -> b`` for every import statement
executed when ``a`` is imported (module level, including ``try``/``if`` blocks, but not ``if TYPE_CHECKING:``).
Importing ``p.q.r`` also runs ``p/__init__`` and ``p/q/__init__``, so those count as edges too (except the
importer's own packages, which are already being imported). Function-level imports are allowed only for the
optional or heavy dependencies listed in :data:`LAZY_OK` and in the modules of :data:`LAZY_MODULES`, whose
lazy imports keep ``import adaptkit`` and ``adaptkit --help`` fast (tests/test_cli_startup.py).
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "adaptkit"

#: third-party packages a function may import lazily: the optional dependencies (peft, diffusers, transformers at
#: run time, matplotlib, gguf), huggingface_hub (only hub sources need it; tests patch its functions where they are
#: looked up) and tqdm (adaptkit.progress is imported at CLI startup; the bar library only when a bar is drawn)
LAZY_OK = {"peft", "diffusers", "transformers", "matplotlib", "huggingface_hub", "tqdm", "gguf"}
#: modules whose function-level imports are the lazy loading itself: the PEP 562 package namespace and the CLI
#: command modules (``adaptkit --help`` must not import torch/pandas: each command imports what it runs)
LAZY_MODULES = {"adaptkit", "adaptkit.cli.*"}


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported (not inside functions/classes, not TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)


def _nested(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements inside functions (any depth), outside ``if TYPE_CHECKING:``."""
    def walk(node: ast.AST, in_function: bool) -> Iterator[ast.Import | ast.ImportFrom]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                continue
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    yield from walk(tree, False)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """The absolute names an import statement imports (modules of the package, or third-party names)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # `from pkg import sub` imports the submodule pkg.sub (after pkg itself); `from pkg import name`: pkg
    subs = [f"{prefix}.{a.name}" for a in node.names if f"{prefix}.{a.name}" in modules]
    return subs if len(subs) == len(node.names) else [prefix, *subs]


def build_graph(root: Path, package: str = PACKAGE, nested_edges: bool = False
                ) -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]]]:
    """``(edges, nested)``: module -> package modules it imports; module -> its function-level imports.

    ``edges`` holds the module-level imports, and with ``nested_edges`` the function-level ones too (a
    dependency hidden in a function is still a dependency: a circle through one is a circle).
    """
    files = {_module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    modules = set(files)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    nested: dict[str, list[tuple[int, str]]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        own = {".".join(module.split(".")[:i]) for i in range(1, len(module.split(".")) + 1)}

        def add(target: str) -> None:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # importing p.q.r runs p and p.q first
                name = ".".join(parts[:i])
                if name in modules and name not in own and (i == len(parts) or name != package):
                    edges[module].add(name)

        for node in _module_level(tree.body):
            for target in _targets(node, module, is_package, modules):
                add(target)
        for node in _nested(tree):
            for target in _targets(node, module, is_package, modules):
                nested.setdefault(module, []).append((node.lineno, target))
                if nested_edges:
                    add(target)
    return edges, nested


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (or a self-import), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's algorithm, iterative over the successors of each node
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
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
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def _lazy_allowed(module: str, target: str) -> bool:
    if target.split(".")[0] in LAZY_OK:
        return True
    return any(module == m or (m.endswith(".*") and module.startswith(m[:-1])) for m in LAZY_MODULES)


def test_no_import_cycle():
    edges, _ = build_graph(ROOT)
    cycles = find_cycles(edges)
    assert cycles == [], "import cycles between modules: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_dependency_cycle_through_function_level_imports():
    edges, _ = build_graph(ROOT, nested_edges=True)
    cycles = find_cycles(edges)
    assert cycles == [], "dependency cycles between modules (counting imports inside functions): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_imports_at_the_top_of_files():
    _, nested = build_graph(ROOT)
    bad = [f"{m}:{line} imports {t}" for m, items in sorted(nested.items()) for line, t in items
           if not _lazy_allowed(m, t)]
    assert bad == [], "function-level imports (move them to the top of the file):\n" + "\n".join(bad)


# ------------------------------------------------------------------------------- the checks can fail


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


@pytest.mark.parametrize("files, cycle", [
    ({"__init__.py": "", "a.py": "from . import b\n", "b.py": "from .a import x\n"}, ["pkg.a", "pkg.b"]),
    ({"__init__.py": "", "x/__init__.py": "", "x/a.py": "from ..y.b import f\n", "y/__init__.py": "",
      "y/b.py": "import pkg.z\n", "z.py": "try:\n    from .x import a\nexcept ImportError:\n    pass\n"},
     ["pkg.x.a", "pkg.y.b", "pkg.z"]),
    # importing pkg.q.mod runs pkg/q/__init__, which imports the importer back
    ({"__init__.py": "", "p.py": "from .q.mod import f\n", "q/__init__.py": "from ..p import g\n", "q/mod.py": ""},
     ["pkg.p", "pkg.q"]),
])
def test_a_planted_cycle_is_found(tmp_path, files, cycle):
    edges, _ = build_graph(_plant(tmp_path, files), "pkg")
    assert find_cycles(edges) == [cycle]


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    files = {"__init__.py": "", "a.py": "from .b import f\n", "b.py": "def f():\n    from .a import g\n"}
    root = _plant(tmp_path, files)
    assert find_cycles(build_graph(root, "pkg")[0]) == []
    assert find_cycles(build_graph(root, "pkg", nested_edges=True)[0]) == [["pkg.a", "pkg.b"]]


def test_type_checking_imports_and_acyclic_graphs_pass(tmp_path):
    files = {"__init__.py": "", "a.py": "from typing import TYPE_CHECKING\nfrom . import b\nif TYPE_CHECKING:\n"
             "    from .c import C\n", "b.py": "import os\n", "c.py": "from .a import x\n"}
    edges, _ = build_graph(_plant(tmp_path, files), "pkg")
    assert find_cycles(edges) == []
    assert edges["pkg.a"] == {"pkg.b"}


def test_a_planted_function_level_import_is_found(tmp_path):
    files = {"__init__.py": "", "a.py": "def f():\n    import torch\n    from . import b\n    import matplotlib\n",
             "b.py": "class K:\n    def m(self):\n        from .a import f\n"}
    _, nested = build_graph(_plant(tmp_path, files), "pkg")
    bad = sorted((m, t) for m, items in nested.items() for _, t in items if not _lazy_allowed(m, t))
    assert bad == [("pkg.a", "pkg.b"), ("pkg.a", "torch"), ("pkg.b", "pkg.a")]
