"""The package's import graph has no cycle, lazy imports included.

An edge A -> B is any `import` of B written in module A: at module level or inside a
function (a lazy import is a dependency all the same, only deferred), except under `if
TYPE_CHECKING:` (never run). Importing `gqa_convert.model.fused` from outside `model/` also
runs `gqa_convert/model/__init__.py`, so a module also depends on the packages above what it
imports, except its own (already running when it is imported). What this keeps
(ARCHITECTURE.md): export.py, which reads export folders, imports nothing of `model/` (the
model's `from_pretrained` delegates to it), and `model/attention` and `model/fused` do not
import each other both ways.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gqa_convert"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """Every module name `tree` imports, outside `if TYPE_CHECKING:` blocks; for `from M
    import X`, M.X as well as M (X may be a submodule)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}".rstrip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (and the packages above those)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for imported in imported_names(tree, name, path.name == "__init__.py"):
            parts = imported.split(".")
            for i in range(2, len(parts) + 1):  # the packages on the way run too,
                prefix = ".".join(parts[:i])  # but not the importer's own (already running)
                if prefix in files and prefix != name and not name.startswith(prefix + "."):
                    targets.add(prefix)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "gqa_convert.model.decoder" in graph and len(graph) > 25  # it read the package
    assert cycles(graph) == []


def test_what_reads_exports_and_configs_imports_nothing_of_the_model():
    """export.py (reading an export, for `GQATransformer.from_pretrained`) and config.py
    (`GenerationDefaults`, which both use) sit below nothing of model/."""
    graph = import_graph()
    reaches_model = {
        name
        for name, targets in graph.items()
        if any(t.startswith("gqa_convert.model") for t in targets)
    }
    assert "gqa_convert.export" not in reaches_model
    assert "gqa_convert.config" not in reaches_model


def test_the_check_sees_a_planted_cycle(tmp_path):
    """The two circles issue 22 found, written back into a copy of three modules."""
    root = tmp_path / "gqa_convert"
    (root / "model").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "model" / "__init__.py").write_text("from gqa_convert.model.decoder import X\n")
    (root / "model" / "decoder.py").write_text(
        "def from_pretrained():\n    from gqa_convert.export import load_export\n"
    )
    (root / "export.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import gqa_convert.model\n"
        "def load_extras():\n    from gqa_convert.model.generate import GenerationDefaults\n"
    )
    (root / "model" / "generate.py").write_text("")
    (root / "model" / "attention.py").write_text("from .fused import FusedProjections\n")
    (root / "model" / "fused.py").write_text(
        "def fused():\n    from gqa_convert.model.attention import GroupedQueryAttention\n"
    )
    assert cycles(import_graph(root)) == [
        ["gqa_convert.export", "gqa_convert.model", "gqa_convert.model.decoder"],
        ["gqa_convert.model.attention", "gqa_convert.model.fused"],
    ]


@pytest.mark.parametrize(
    "module", ["gqa_convert.export", "gqa_convert.model.fused", "gqa_convert.model.generate"]
)
def test_a_module_of_the_circles_imports_alone(module):
    """In a fresh interpreter, first of the package: no partially initialised module."""
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=120)
