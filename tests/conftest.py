"""Fixtures shared across the test folders."""
from __future__ import annotations

import importlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

# torch.compile's kernel cache does not key on ATEN_CPU_CAPABILITY: a kernel vectorised under one level is reused
# under another, whose headers lack the vector types, and fails to build. One cache per level keeps runs of the
# suite under several levels (.ci/run, bench/cpu_paths.sh) apart.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _level = os.environ.get("ATEN_CPU_CAPABILITY", "native")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"alq_torchinductor_{_level}")


@pytest.fixture
def umask_027() -> Iterator[int]:
    """Runs the test under umask 027; yields the mode a new file then gets (0o640)."""
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


@pytest.fixture
def bench_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], ModuleType]]:
    """Imports a script of ``bench/`` (and its ``common`` helpers) afresh; forgets both afterwards."""
    monkeypatch.syspath_prepend(str(BENCH))
    imported = []

    def load(name: str) -> ModuleType:
        for stale in ("common", name):
            monkeypatch.delitem(sys.modules, stale, raising=False)
        imported.append(name)
        return importlib.import_module(name)

    yield load
    for name in ("common", *imported):
        sys.modules.pop(name, None)
