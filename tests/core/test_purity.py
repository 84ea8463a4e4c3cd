"""The core is pure PyTorch: no training framework, configuration or logging library is imported there."""
import ast
from pathlib import Path

import pytest

import alq_lightning.core

FORBIDDEN = {"lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb"}
CORE = Path(alq_lightning.core.__file__).parent
FILES = sorted(CORE.rglob("*.py"))


def imported_modules(tree):
    """Absolute module names imported by ``import``, ``from ... import`` and ``importlib``/``__import__`` calls."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.args[0].value


def test_core_files_found():
    names = {path.name for path in FILES}
    assert {"layout.py", "multibit.py", "stats.py", "steps.py", "prune.py", "schedule.py", "accounting.py"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_framework_imports(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = sorted({m for m in imported_modules(tree) if m.split(".")[0] in FORBIDDEN})
    assert not bad, f"{path.name} imports {bad}"


def test_scanner_detects_forbidden_imports():
    source = ("import lightning.pytorch as pl\nfrom omegaconf import DictConfig\n"
              "import importlib\nimportlib.import_module('wandb')\n")
    found = {m.split(".")[0] for m in imported_modules(ast.parse(source))}
    assert {"lightning", "omegaconf", "wandb"} <= found
