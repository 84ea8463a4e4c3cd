"""bench/bench_core.py keeps every run: the stored runs list, a file from before it, and the history table."""
from __future__ import annotations

import json

import pytest


@pytest.fixture
def core(bench_module):
    return bench_module("bench_core")


def run(date: str, commit: str | None, dirty: bool = False, device: str = "cpu") -> dict:
    step = {"seconds": 0.01, "ratio": 0.2}
    model = {"num_weights": 10, "max_bits": 6, "float_step_s": 0.05, "init_s": 0.04, "slow_float_step": False,
             "steps": dict.fromkeys(("basis", "coordinate", "ste", "prune"), step), "worst_step_ratio": 0.2,
             "basis_extra_memory_mb": 1.0, "authors_table_mb": 2.0, "float_step_repeats": 5}
    return {"hardware": "cpu", "device": device, "threads": 2, "torch": "2", "date": date, "git_commit": commit,
            "git_dirty": dirty, "batch_size": 128, "repeats": 5, "models": {"lenet5": model}}


def test_runs_are_read_from_the_list_or_the_older_single_run_file(core, tmp_path):
    """A missing file has no runs, a file from before the list is its one run, a list file gives its runs."""
    path = tmp_path / "core.json"
    assert core.load_runs(path) == []
    old = run("2026-11-27T21:41:45", None)
    path.write_text(json.dumps(old))
    assert core.load_runs(path) == [old]
    path.write_text(json.dumps({"runs": [old, run("2026-12-02", "b" * 40)]}))
    assert [r["date"] for r in core.load_runs(path)] == ["2026-11-27T21:41:45", "2026-12-02"]


def test_markdown_lists_every_kept_run_of_the_device_with_its_commit(core):
    """The latest run's table, then one line per kept run of the same device, oldest first, naming its commit."""
    old = {**run("2026-11-27", None), "inferred_git_commit": "c" * 40}
    runs = [old, run("2026-12-01", "a" * 40, dirty=True), run("2026-12-01", "d" * 40, device="cuda"),
            run("2026-12-02", "b" * 40)]
    text = core.markdown(runs[-1], runs)
    history = text[text.index("Every kept CPU run (3"):]
    assert history.index("`ccccccc` (inferred)") < history.index("`aaaaaaa` + uncommitted changes") \
        < history.index("`bbbbbbb` |")
    assert "ddddddd" not in text and "2026-12-02." in text
