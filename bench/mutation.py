"""Mutation scores of three packages with mutmut, each against its own tests.

    python bench/mutation.py [--package core|callbacks|packed|all] [--max-mutants N] [--resume | --retest]
                             [--workers 1]

For each package the working tree's ``alq_lightning/``, ``tests/``, ``conf/`` and ``bench/*.py`` are copied into
``bench/runs/mutation/<package>/`` (git-ignored) and mutmut runs there: it mutates its own copy under
``mutants/``, so the source tree is never written, whatever happens to the run. One worker process by default,
``OMP_NUM_THREADS=1``; each mutant runs only the tests that reach the mutated function (mutmut's per-function
test selection), stops at the first failure, and is killed after a CPU-time limit scaled from those tests'
clean duration (``--timeout-multiplier``, ``--timeout-constant``). Hypothesis runs derandomized without its
example database, so a run is reproducible.

``--retest`` reuses a finished run after tests were added: the snapshot's tests are replaced by the working
tree's and only the mutants not killed are run again. A killed mutant stays killed because tests are only ever
added; the run is refused when a mutated source file differs from the snapshot, when the test selection would
change (mutmut would then discard every verdict) or when a clean test fails.

Writes ``bench/results/mutation.json`` (per package: killed, survived, timeout, no tests, total, % killed, and an
"adjusted" % that leaves out the survivors judged equivalent in ``bench/mutation_equivalent.md``) and a table
between ``<!-- mutation:begin -->``/``<!-- mutation:end -->`` in ``bench/RESULTS.md``. Survivors' diffs go to
``bench/runs/mutation/<package>/survivors.diff``. Not run in CI.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from common import git_state, hardware, write_section
from mutation_report import equivalents, score, statuses, table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNS = HERE / "runs" / "mutation"
COPIED = ("alq_lightning", "tests", "conf", "pyproject.toml")
MUTMUT_MARK = re.compile(r"__mutmut_\d|mutmut generated")


@dataclass(frozen=True)
class Package:
    """Files to mutate (globs relative to the root), the tests that judge them and the bar on % killed."""

    sources: tuple[str, ...]
    tests: tuple[str, ...]
    bar: float
    markers: str = "not slow and not gpu"


PACKAGES = {
    # core/*.py: the math (multibit, steps, prune, bucket, activations, bitwise, ...), each with a tests/core file
    "core": Package(("alq_lightning/core/*.py",), ("tests/core",), 90.0),
    # the file format, packed and bitwise inference, and bit_summary (tests/packed/test_summary.py)
    "packed": Package(
        ("alq_lightning/packed/*.py", "alq_lightning/summary.py"),
        ("tests/packed",),
        85.0,
    ),
    # the Lightning callbacks and the torch-level modules under them: quantized layers and their selection
    # (tests/test_selection.py), the network and its buckets, the input quantizers
    "callbacks": Package(
        ("alq_lightning/callbacks/*.py", "alq_lightning/network.py", "alq_lightning/layers.py",
         "alq_lightning/buckets.py", "alq_lightning/activations.py"),
        ("tests/callbacks", "tests/test_selection.py"),
        80.0,
    ),
}

HYPOTHESIS_CONFTEST = '''"""Written by bench/mutation.py: reproducible Hypothesis runs for mutation testing."""
from hypothesis import settings

settings.register_profile("alq-mutation", derandomize=True, database=None, deadline=None)
'''


def mutmut_version() -> str:
    try:
        return version("mutmut")
    except PackageNotFoundError:
        sys.exit("mutmut is not installed: pip install -e '.[mutation]'")


def leaked_mutants() -> list[str]:
    """Files of the source tree that carry mutmut's trampolines (there must never be any)."""
    return [str(path.relative_to(ROOT)) for path in sorted((ROOT / "alq_lightning").rglob("*.py"))
            if MUTMUT_MARK.search(path.read_text(errors="replace"))]


def expand(patterns: tuple[str, ...], base: Path) -> list[str]:
    """Glob patterns relative to ``base`` -> sorted existing paths (a pattern without a match is dropped)."""
    found: list[str] = []
    for pattern in patterns:
        found += sorted(str(p.relative_to(base)) for p in base.glob(pattern) if p.name != "__pycache__")
    return found


def failing_tests(work: Path, tests: list[str], pytest_args: list[str], env: dict) -> list[str]:
    """Node ids (or files that fail to collect) of the tests that fail on the unmutated snapshot."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", *pytest_args, *tests], cwd=work, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode in (0, 5):
        return []
    failed = sorted({match[1] for match in re.finditer(r"^(?:FAILED|ERROR) (\S+)", done.stdout, flags=re.M)})
    if not failed:
        sys.exit(f"the clean test run failed without naming a test:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return failed


def prepare(name: str, package: Package, args: argparse.Namespace, work: Path, env: dict) -> tuple[list[str], list]:
    """A fresh snapshot of the working tree in ``work`` with a ``[tool.mutmut]`` section.

    Returns the test paths and the tests left out because they fail before any mutation (someone's work in
    progress): a mutant cannot be judged by a test that fails anyway, and mutmut refuses to start with one.
    """
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    for item in COPIED:
        source = ROOT / item
        if source.is_dir():
            shutil.copytree(source, work / item, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, work / item)
    (work / "bench").mkdir()
    for script in sorted(HERE.glob("*.py")):  # the bench_module fixture imports them (bench_launches, common)
        shutil.copy2(script, work / "bench" / script.name)
    (work / "conftest.py").write_text(HYPOTHESIS_CONFTEST)
    tests = expand(package.tests, work)
    if not tests:
        sys.exit(f"{name}: no tests match {package.tests}")
    pytest_args = ["-p", "no:cacheprovider", "-m", package.markers, "--hypothesis-profile=alq-mutation"]
    failed = failing_tests(work, tests, pytest_args, env)
    for test in failed:
        print(f"{name}: left out, fails without any mutation: {test}", flush=True)
        pytest_args.append(f"--deselect={test}" if "::" in test else f"--ignore={test}")
    section = {
        "source_paths": ["alq_lightning"],
        "only_mutate": list(package.sources),
        "do_not_mutate": ["*/__init__.py"],
        "also_copy": ["conftest.py", "conf", "bench"],
        "pytest_add_cli_args": pytest_args,
        "pytest_add_cli_args_test_selection": tests,
        "timeout_multiplier": args.timeout_multiplier,
        "timeout_constant": args.timeout_constant,
        "process_isolation": args.isolation,
        "use_git_change_detection": False,
    }
    if "[tool.mutmut]" in (work / "pyproject.toml").read_text():
        sys.exit("pyproject.toml has its own [tool.mutmut] section; bench/mutation.py writes that section itself")
    lines = ["", "[tool.mutmut]"] + [f"{key} = {json.dumps(value)}" for key, value in section.items()]
    with open(work / "pyproject.toml", "a") as handle:
        handle.write("\n".join(lines) + "\n")
    return tests, failed


def retest(name: str, package: Package, work: Path, env: dict) -> tuple[list[str], list, list[str]]:
    """Swap the working tree's tests into a finished snapshot; the tests, the left-out ones, the mutants to rerun."""
    if not (work / "mutants").exists():
        sys.exit(f"{name}: no finished run in {work} to retest; run without --retest")
    changed = [path for path in expand(package.sources, ROOT)
               if not (work / path).exists() or (work / path).read_bytes() != (ROOT / path).read_bytes()]
    if changed or expand(package.sources, ROOT) != expand(package.sources, work):
        sys.exit(f"{name}: the mutated sources changed since the snapshot ({', '.join(changed) or 'files added'}); "
                 "run without --retest")
    tests, failed = json.loads((work / "tests.json").read_text())
    rerun = [key for key, status in statuses(work, env).items() if status not in ("killed", "not checked")]
    shutil.rmtree(work / "tests")
    shutil.copytree(ROOT / "tests", work / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache"))
    if expand(package.tests, work) != tests:
        sys.exit(f"{name}: the test selection changed ({expand(package.tests, work)} != {tests}): mutmut would "
                 "discard every verdict; run without --retest")
    args = ["-p", "no:cacheprovider", "-m", package.markers, "--hypothesis-profile=alq-mutation"]
    args += [f"--deselect={test}" if "::" in test else f"--ignore={test}" for test in failed]
    newly_failing = sorted(set(failing_tests(work, tests, args, env)) - set(failed))
    if newly_failing:
        sys.exit(f"{name}: these tests fail without any mutation: {newly_failing}")
    return tests, failed, rerun


def mangled_functions(work: Path, package: Package) -> list[str]:
    """mutmut's name prefix of every function and method it can mutate: ``module.x_f`` / ``module.xǁCǁm``."""
    names = []
    for path in expand(package.sources, work):
        module = path[:-3].replace("/", ".").removesuffix(".__init__")
        tree = ast.parse((work / path).read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.append(f"{module}.x_{node.name}")
            elif isinstance(node, ast.ClassDef):
                names += [f"{module}.xǁ{node.name}ǁ{item.name}" for item in node.body
                          if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return names


def sample(work: Path, package: Package, count: int) -> list[str]:
    """At most ``count`` mutant names spread over all functions: the first mutant of each, then the second, ...

    Names that do not exist (a function with fewer mutants) are ignored by mutmut.
    """
    functions = mangled_functions(work, package)
    functions = functions[:: max(1, len(functions) // count)]
    return [f"{function}__mutmut_{index}" for index in range(1, count + 1) for function in functions][:count]


def interrupt(signum, frame) -> None:
    """SIGTERM handler: stop like Ctrl-C, so that mutmut's process group is stopped too."""
    raise KeyboardInterrupt


def run_mutmut(work: Path, arguments: list[str], log: Path, env: dict) -> int:
    """Run ``mutmut`` in ``work`` in its own process group, logging to ``log``; report progress every minute.

    On Ctrl-C or SIGTERM the whole group (mutmut and its forked workers) is stopped; only ``work`` was touched.
    """
    command = [sys.executable, "-m", "mutmut", *arguments]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            while True:
                try:
                    return process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    print(f"    {progress(log)}", flush=True)
        except KeyboardInterrupt:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)


def progress(log: Path) -> str:
    """The last status line mutmut drew (``done/total`` and counts by outcome)."""
    tail = log.read_bytes()[-4000:].decode(errors="replace")
    lines = [line.strip() for line in re.split(r"[\r\n]", tail) if re.search(r"\d+/\d+", line)]
    return lines[-1] if lines else "(starting)"


def run_package(name: str, args: argparse.Namespace, tool: str) -> dict:
    """Snapshot (or resume), run mutmut, score; the result entry of ``name`` for ``mutation.json``."""
    began = time.perf_counter()
    package = PACKAGES[name]
    work = RUNS / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "PYTHONHASHSEED": "0"}
    spent = work / "seconds.json"  # wall time adds up over an interrupted run and its resumptions
    rerun: list[str] = []
    if args.retest:
        tests, failed, rerun = retest(name, package, work, env)
        print(f"{name}: retesting the {len(rerun)} mutants not killed in {work.relative_to(ROOT)}")
        earlier = json.loads(spent.read_text()) if spent.exists() else {"total": 0.0, "mutmut": 0.0}
    elif args.resume and (work / "mutants").exists():
        print(f"{name}: resuming in {work.relative_to(ROOT)}")
        tests, failed = json.loads((work / "tests.json").read_text())
        earlier = json.loads(spent.read_text()) if spent.exists() else {"total": 0.0, "mutmut": 0.0}
    else:
        tests, failed = prepare(name, package, args, work, env)
        (work / "tests.json").write_text(json.dumps([tests, failed]))
        earlier = {"total": 0.0, "mutmut": 0.0}
    log = work / "mutmut.log"
    arguments = ["run", "--max-children", str(args.workers)]
    if args.max_mutants:
        arguments += sample(work, package, args.max_mutants)
    arguments += rerun
    print(f"{name}: mutating {', '.join(package.sources)} against {' '.join(tests)} (log: {log.relative_to(ROOT)})",
          flush=True)
    start = time.perf_counter()
    try:
        code = run_mutmut(work, arguments, log, env)
    finally:
        mutmut_seconds = earlier["mutmut"] + time.perf_counter() - start
        total = earlier["total"] + time.perf_counter() - began
        spent.write_text(json.dumps({"total": total, "mutmut": mutmut_seconds}))
    if leaked_mutants():
        sys.exit(f"mutated code found in the source tree: {leaked_mutants()}")
    if code != 0:
        sys.exit(f"{name}: mutmut exited with {code}; see {log} (a failing clean test run stops it)")
    found = statuses(work, env)
    result = score(found, equivalents(HERE / "mutation_equivalent.md"), work, env, work / "survivors.diff")
    command = f"python bench/mutation.py --package {name}" + (f" --max-mutants {args.max_mutants}"
                                                               if args.max_mutants else "")
    command += f" --workers {args.workers}" if args.workers != 1 else ""
    command += " --retest" if args.retest else ""
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        **git_state(ROOT),
        "tool": tool,
        "hardware": hardware("cpu"),
        "command": command,
        "sources": list(package.sources),
        "tests": tests,
        "pytest_markers": package.markers,
        "left_out_failing_tests": failed,
        "timeout": {"multiplier": args.timeout_multiplier, "constant_s": args.timeout_constant},
        "sampled": args.max_mutants or None,
        "workers": args.workers,
        "resumed": bool(args.resume),
        "retested": len(rerun) if args.retest else None,
        "seconds": round(earlier["total"] + time.perf_counter() - began, 1),
        "mutmut_seconds": round(mutmut_seconds, 1),
        "bar_percent_killed": package.bar,
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", choices=[*PACKAGES, "all"], default="core")
    parser.add_argument("--max-mutants", type=int, default=0, help="run at most N mutants, spread over functions")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run without a new snapshot")
    parser.add_argument("--retest", action="store_true",
                        help="after adding tests: rerun only the mutants a finished run did not kill")
    parser.add_argument("--workers", type=int, default=1, help="mutants run at once (one per free core)")
    parser.add_argument("--timeout-multiplier", type=float, default=5.0,
                        help="a mutant may use (clean test time + constant) x multiplier x 2 CPU seconds")
    parser.add_argument("--timeout-constant", type=float, default=2.0)
    parser.add_argument("--isolation", choices=["fork", "forkserver"], default="fork",
                        help="mutmut's process_isolation: fork each mutant from the main process or a fork server")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "mutation.json")
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    tool = f"mutmut {mutmut_version()}"
    if leaked_mutants():
        sys.exit(f"mutated code found in the source tree before the run: {leaked_mutants()}")
    results = json.loads(args.out.read_text())["packages"] if args.out.exists() else {}
    for name in PACKAGES if args.package == "all" else [args.package]:
        try:
            results[name] = run_package(name, args, tool)
        except KeyboardInterrupt:
            leaked = leaked_mutants()
            sys.exit(f"{name}: interrupted; the source tree is {'NOT clean: ' + str(leaked) if leaked else 'clean'}; "
                     f"continue with --package {name} --resume")
        r = results[name]
        print(f"{name}: {r['killed']}/{r['total']} killed ({r['percent_killed']} %, adjusted "
              f"{r['percent_killed_adjusted']} %), {r['survived']} survived, {r['timeout']} timeout, "
              f"{r['no_tests']} no tests, in {r['seconds'] / 60:.1f} min", flush=True)
        stored = json.loads(args.out.read_text())["packages"] if args.out.exists() else {}
        results = {**stored, name: r}  # another package's run may have finished meanwhile
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"tool": tool, "packages": results}, indent=1, ensure_ascii=False) + "\n")
        write_section(args.markdown, "mutation", table(results, list(PACKAGES)))


if __name__ == "__main__":
    main()
