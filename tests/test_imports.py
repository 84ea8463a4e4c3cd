"""Imports inside ``alq_lightning`` run one way: no module imports, directly or through others, a module that
imports it, and the packed-file modules import only those below them (format -> io -> bitwise -> inference
-> checkpoint -> cli). Every import statement counts, also those inside functions and ``if TYPE_CHECKING:``
blocks: a lazy import only hides a cycle until the day it runs first."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import alq_lightning

PACKAGE = Path(alq_lightning.__file__).resolve().parent
PACKED_ORDER = ("format", "io", "bitwise", "inference", "checkpoint", "cli")


def module_names(package: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file under ``package`` (a package's name for its
    ``__init__.py``)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` (at ``path``) imports anywhere in its source: ``import a.b``,
    ``from a import b`` (the submodule ``a.b`` when there is one, else ``a``), relative imports resolved
    against the module's package, and ``importlib.import_module("a.b")`` with a constant name."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            targets = [node.args[0].value]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import a.b.c`` of a name inside a.b: the module a.b
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    names = module_names(package)
    return {module: imported(module, path, set(names)) for module, path in names.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of ``graph``, or None; depth-first, in sorted order (reproducible)."""
    done, path = set(), []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert {"alq_lightning.packed.format", "alq_lightning.layers", "alq_lightning.callbacks.alq_callback"} <= set(graph)
    assert "alq_lightning.packed.format" in graph["alq_lightning.packed.io"]
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("position,name", list(enumerate(PACKED_ORDER)))
def test_packed_modules_import_only_those_below_them(position, name):
    graph = import_graph(PACKAGE)
    siblings = {f"alq_lightning.packed.{other}" for other in PACKED_ORDER}
    allowed = {f"alq_lightning.packed.{other}" for other in PACKED_ORDER[:position]}
    uses = graph[f"alq_lightning.packed.{name}"] & (siblings | {"alq_lightning.packed"})
    assert uses <= allowed, f"packed.{name} imports {sorted(uses - allowed)}, which sit above it in {PACKED_ORDER}"


def test_a_planted_cycle_is_found_and_named(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text("import os\n")
    (package / "sub" / "__init__.py").write_text("from .one import thing\n")
    (package / "sub" / "one.py").write_text("from ..base import os\nfrom . import two\nthing = 1\n")
    (package / "sub" / "two.py").write_text("def later():\n    from pkg import top\n")
    (package / "top.py").write_text("import importlib\nimportlib.import_module('pkg.sub.one')\n")
    graph = import_graph(package)
    assert graph == {"pkg": set(), "pkg.base": set(), "pkg.sub": {"pkg.sub.one"},
                     "pkg.sub.one": {"pkg.base", "pkg.sub.two"}, "pkg.sub.two": {"pkg.top"}, "pkg.top": {"pkg.sub.one"}}
    assert find_cycle(graph) == ["pkg.sub.one", "pkg.sub.two", "pkg.top", "pkg.sub.one"]
    (package / "top.py").write_text("")
    assert find_cycle(import_graph(package)) is None
