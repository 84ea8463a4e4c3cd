"""Packaging: console scripts, ``python -m alq_lightning COMMAND``, py.typed, the version in one place, LICENSE,
and a wheel that carries the Hydra configs so that ``alq-train`` runs from an installed package."""
from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import alq_lightning
from alq_lightning import cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = {
    "alq-train": "alq_lightning.app.train:main",
    "alq-export": "alq_lightning.cli:export",
    "alq-summary": "alq_lightning.cli:summary",
    "alq-eval": "alq_lightning.cli:evaluate",
    "alq-consolidate": "alq_lightning.cli:consolidate",
}


def resolve(target: str) -> object:
    module, _, attribute = target.partition(":")
    value = importlib.import_module(module)
    for name in attribute.split("."):
        value = getattr(value, name)
    return value


def run_module(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m alq_lightning ARGS`` with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "alq_lightning", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_pyproject_declares_the_console_scripts_and_each_resolves_to_a_callable():
    assert PYPROJECT["project"]["scripts"] == SCRIPTS
    for name, target in SCRIPTS.items():
        assert callable(resolve(target)), name


def test_console_scripts_of_the_installed_metadata_resolve_to_callables():
    # The venv's metadata may come from another checkout's install: every alq_lightning script it declares must
    # still load, and any of this checkout's names it declares must point where pyproject.toml says.
    declared = [ep for ep in entry_points(group="console_scripts")
                if ep.dist is not None and ep.dist.metadata["Name"].replace("-", "_") == "alq_lightning"]
    for ep in declared:
        assert callable(ep.load()), ep
        if ep.name in SCRIPTS:
            assert ep.value == SCRIPTS[ep.name]


def test_console_script_functions_name_themselves_in_their_usage(capsys):
    for function, usage in ((cli.export, "usage: alq-export [-h] [--coord-bits {16,32}]"),
                            (cli.summary, "usage: alq-summary [-h] path"),
                            (cli.evaluate, "usage: alq-eval [-h] [--model MODEL] [--data DATA] [--run RUN]"),
                            (cli.consolidate, "usage: alq-consolidate [-h] folder file")):
        with pytest.raises(SystemExit) as done:
            function(["--help"])
        assert done.value.code == 0
        assert " ".join(capsys.readouterr().out.split()).startswith(usage)


def test_train_py_is_the_packaged_app():
    sys.path.insert(0, str(ROOT))
    try:
        import train
    finally:
        sys.path.remove(str(ROOT))
    app = importlib.import_module("alq_lightning.app.train")
    assert train.main is app.main and train.train is app.train
    assert app.config_dir() == ROOT / "conf"  # a checkout runs on its own conf/


@pytest.mark.parametrize("command,usage", [
    ("summary", "usage: python -m alq_lightning summary [-h] path"),
    ("export", "usage: python -m alq_lightning export [-h] [--coord-bits {16,32}]"),
    ("eval", "usage: python -m alq_lightning eval [-h] [--model MODEL] [--data DATA] [--run RUN] [--bitwise]"),
    ("consolidate", "usage: python -m alq_lightning consolidate [-h] folder file"),
])
def test_module_commands_print_their_usage(command, usage):
    done = run_module(command, "--help")
    assert done.returncode == 0, done.stderr
    assert " ".join(done.stdout.split()).startswith(usage)


def test_module_command_passes_its_arguments_on(tmp_path):
    done = run_module("summary", str(tmp_path / "missing.alq"))
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "missing.alq" in done.stderr


@pytest.mark.parametrize("args,problem", [
    (["bogus"], "unknown command 'bogus'"),
    ([], "a command is required"),
])
def test_unknown_or_missing_command_is_a_usage_error_naming_the_commands(args, problem):
    done = run_module(*args)
    assert done.returncode == 2 and done.stdout == ""
    assert f"python -m alq_lightning: error: {problem} (choose from export, summary, eval, consolidate)" in done.stderr
    assert "usage: python -m alq_lightning {export,summary,eval,consolidate} ..." in done.stderr


def test_the_commands_run_only_through_the_package(tmp_path):
    """``python -m alq_lightning.export`` / ``.summary`` are gone: no module runs as a command in their place."""
    # The file, not ``python -m``: an editable install of another checkout would answer for a module absent here.
    assert not (ROOT / "alq_lightning" / "export.py").exists() and not (ROOT / "alq_lightning" / "export").exists()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "alq_lightning.summary", str(tmp_path / "m.alq")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == ("alq_lightning.summary is not a command: run `alq-summary FILE.alq` or "
                                   "`python -m alq_lightning summary FILE.alq`")


def test_module_help_lists_the_commands():
    done = run_module("--help")
    assert done.returncode == 0
    assert done.stdout.startswith("usage: python -m alq_lightning {export,summary,eval,consolidate} ...")
    assert "\n  export " in done.stdout and "\n  summary " in done.stdout and "\n  eval " in done.stdout
    assert "\n  consolidate " in done.stdout


def test_py_typed_is_shipped_as_package_data():
    assert (ROOT / "alq_lightning" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["alq_lightning"]


def test_version_is_read_from_the_package():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "alq_lightning.__version__"}
    source = ast.parse((ROOT / "alq_lightning" / "__init__.py").read_text())
    (assigned,) = [node.value.value for node in source.body if isinstance(node, ast.Assign)
                   and [getattr(target, "id", None) for target in node.targets] == ["__version__"]]
    assert assigned == alq_lightning.__version__
    assert alq_lightning.__version__.count(".") == 2


def test_importing_the_package_stays_light():
    code = "import sys, alq_lightning; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning'}))"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_license_is_mit():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 alq_lightning contributors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text
    assert PYPROJECT["project"]["license"] == {"text": "MIT"}


def test_listed_packages_are_the_source_tree_and_its_configs():
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"alq_lightning.conf": "conf"}
    code = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "alq_lightning").rglob("__init__.py")}
    configs = {".".join(("alq_lightning", *path.relative_to(ROOT).parts)) for path in (ROOT / "conf").rglob("*")
               if path.is_dir() and path.name != "__pycache__"}
    assert sorted(setuptools["packages"]) == sorted(code | configs | {"alq_lightning.conf"})
    assert setuptools["package-data"]["*"] == ["*.yaml"]
    assert {path.suffix for path in (ROOT / "conf").rglob("*") if path.is_file()} == {".yaml", ".md"}


@pytest.mark.slow
def test_the_wheel_carries_configs_scripts_version_and_license(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("alq_lightning", "conf"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(tmp_path / 'dist')!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(source)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is absent from the `packages` configuration" not in done.stderr
    with zipfile.ZipFile(tmp_path / "dist" / done.stdout.strip().splitlines()[-1]) as wheel:
        names = set(wheel.namelist())
        info = f"alq_lightning-{alq_lightning.__version__}.dist-info"
        scripts = wheel.read(f"{info}/entry_points.txt").decode()
        metadata = wheel.read(f"{info}/METADATA").decode()
        license_text = wheel.read(f"{info}/licenses/LICENSE").decode()
    configs = {f"alq_lightning/conf/{path.relative_to(ROOT / 'conf').as_posix()}"
               for path in (ROOT / "conf").rglob("*") if path.is_file()}
    assert configs <= names and "alq_lightning/conf/config.yaml" in configs
    assert {"alq_lightning/py.typed", "alq_lightning/__main__.py", "alq_lightning/app/train.py"} <= names
    assert not any(name.startswith(("conf/", "tests/", "bench/")) or name == "train.py" for name in names)
    for name, target in SCRIPTS.items():
        assert f"{name} = {target}" in scripts
    assert f"\nVersion: {alq_lightning.__version__}\n" in metadata
    assert license_text.startswith("MIT License")
