"""Reading a mutmut run back: outcomes per mutant, survivors' diffs, equivalents, scores, the RESULTS.md table.

Used by ``bench/mutation.py``.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

STATUSES = ("killed", "survived", "timeout", "no tests", "suspicious", "segfault", "skipped", "caught by type check",
            "check was interrupted by user", "not checked")


def statuses(work: Path, env: dict) -> dict[str, str]:
    """``{mutant name: status}`` of every mutant mutmut generated."""
    done = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work, env=env,
                          capture_output=True, text=True, check=True)
    found = {}
    for line in done.stdout.splitlines():
        key, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in key:
            found[key] = status
    return found


def mutated_lines(work: Path, name: str, env: dict) -> tuple[str, list[str]]:
    """``mutmut show``: the diff of one mutant and its added lines (whitespace-normalised)."""
    diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, env=env, capture_output=True,
                          text=True, check=False).stdout
    added = [" ".join(line[1:].split()) for line in diff.splitlines() if line.startswith("+") and
             not line.startswith("+++")]
    return diff, added


def equivalents(path: Path) -> dict[str, str]:
    """``{mutant name: mutated line}`` from the bullets ``- `name`: `line``` of ``mutation_equivalent.md``."""
    if not path.exists():
        return {}
    entries = {}
    for match in re.finditer(r"^- `([^`]+__mutmut_\d+)`: `(.*)`\s*$", path.read_text(), flags=re.M):
        entries[match[1]] = " ".join(match[2].split())
    return entries


def score(found: dict[str, str], listed: dict[str, str], work: Path, env: dict, diffs: Path) -> dict:
    """Counts by outcome, raw and adjusted % killed; writes the diffs of every mutant not killed to ``diffs``."""
    checked = {name: status for name, status in found.items() if status != "not checked"}
    counts = {status: sum(s == status for s in checked.values()) for status in STATUSES if status != "not checked"}
    counts["total"] = len(checked)
    survivors = sorted(name for name, status in checked.items() if status != "killed")
    equivalent, stale = [], []
    with open(diffs, "w") as out:
        for name in survivors:
            diff, added = mutated_lines(work, name, env)
            out.write(diff + "\n")
            if name in listed:
                (equivalent if checked[name] == "survived" and listed[name] in added else stale).append(name)
    killed_anyway = sorted(name for name in listed if checked.get(name) == "killed")
    total = counts["total"]
    adjusted_total = total - len(equivalent)
    return {
        **{key.replace(" ", "_"): value for key, value in counts.items()},
        "percent_killed": round(100 * counts["killed"] / total, 2) if total else None,
        "percent_killed_or_timeout": round(100 * (counts["killed"] + counts["timeout"]) / total, 2) if total else None,
        "equivalent": len(equivalent),
        "percent_killed_adjusted": round(100 * counts["killed"] / adjusted_total, 2) if adjusted_total else None,
        "not_killed": [name for name in survivors if name not in equivalent],
        "equivalent_mutants": equivalent,
        "listed_but_not_matching": stale,
        "listed_but_killed": killed_anyway,
    }


def table(results: dict, order: list[str]) -> str:
    lines = [
        "## Mutation testing",
        "",
        "`python bench/mutation.py --package <name>`: mutmut, one worker unless noted, OMP_NUM_THREADS=1, each "
        "mutant against the tests that reach the mutated function. % killed counts timeouts and mutants no test "
        "reaches as not killed; *adjusted* leaves out the survivors listed as equivalent in "
        "`bench/mutation_equivalent.md`; the bar column says whether the raw/adjusted % reaches it. Time: the whole "
        "run, snapshot to score (a retest reruns the survivors of a finished run after tests were added; commit + "
        "changes: the tests not yet committed when it ran).",
        "",
        "| package | killed | survived | timeout | no tests | other | total | % killed | % adjusted | bar | "
        "time | date | commit | tool | hardware |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        if name not in results:
            continue
        r = results[name]
        other = r["total"] - r["killed"] - r["survived"] - r["timeout"] - r["no_tests"]
        met = "/".join("yes" if (r[key] or 0) >= r["bar_percent_killed"] else "no"
                       for key in ("percent_killed", "percent_killed_adjusted"))
        sampled = f" (sample of {r['sampled']})" if r["sampled"] else ""
        workers = f" ({r['workers']} workers)" if r.get("workers", 1) != 1 else ""
        workers += f", then a retest of {r['retested']}" if r.get("retested") else ""
        commit = (r["git_commit"] or "?")[:10] + (" + changes" if r["git_dirty"] else "")
        lines.append(
            f"| {name}{sampled} | {r['killed']} | {r['survived']} | {r['timeout']} | {r['no_tests']} | {other} | "
            f"{r['total']} | {r['percent_killed']} % | {r['percent_killed_adjusted']} % ({r['equivalent']} equiv.) | "
            f"≥ {r['bar_percent_killed']:.0f} %: {met} | {r['seconds'] / 60:.1f} min{workers} | {r['date'][:10]} | "
            f"{commit} | {r['tool']} | {r['hardware']} |"
        )
    return "\n".join(lines)
