"""The accuracy-vs-bits study's comparison against reference points (bench/accuracy_vs_bits.py)."""
from __future__ import annotations

import pytest


@pytest.fixture
def study(bench_module):
    return bench_module("accuracy_vs_bits")


def row(target: float, bits: float, acc: float, std: float = 0.0, seeds: tuple[int, ...] = (0,)) -> dict:
    return {"target_bits": target, "avg_bits_mean": bits, "test_acc_mean": acc, "test_acc_std": std,
            "seeds": list(seeds), "float_test_acc_mean": 0.895, "binary_bytes_mean": 1024.0,
            "coords32_bytes_mean": 2048.0, "coords16_bytes_mean": 1536.0}


RUNS = [{"hardware": {"torch_threads": 1}, "target_bits": 0.7, "seed": 0, "git_commit": "a" * 40}]


def protocol_table(study, rows: list[dict]) -> str:
    """The RESULTS.md table of ``rows`` as a study on the authors' LeNet5 protocol."""
    verdicts = study.against(rows, study.AUTHORS["fmnist_lenet5_protocol"])
    return study.markdown("lenet5", "fmnist_lenet5_protocol", rows, RUNS, verdicts)


def test_best_point_at_equal_or_fewer_bits_decides(study):
    rows = [row(1.0, 0.999, 0.9140), row(0.7, 0.699, 0.9110), row(0.5, 0.499, 0.9119, 0.003, (0, 1, 2)),
            row(0.3, 0.299, 0.9030)]
    verdicts = study.against(rows, [(0.881, 91.15), (0.516, 90.99), (0.35, 90.45), (0.2, 80.0)])

    assert [v["met"] for v in verdicts] == [True, True, False, False]
    assert verdicts[0]["best"]["target_bits"] == 0.5
    assert verdicts[1]["best"]["target_bits"] == 0.5
    assert verdicts[2]["best"]["target_bits"] == 0.3
    assert verdicts[3]["best"] is None


def test_a_point_with_more_bits_never_counts(study):
    verdicts = study.against([row(1.0, 0.9, 0.99)], [(0.881, 91.15)])

    assert verdicts == [{"bits": 0.881, "acc": 91.15, "met": False, "best": None}]


def test_markdown_names_each_reference_point(study):
    rows = [row(0.7, 0.699, 0.9110, 0.0012, (0, 1, 2))]
    text = protocol_table(study, rows)

    assert "- 91.15 % at 0.881 bits: BELOW — 91.10 ± 0.12 % at 0.699 bits (seeds 0, 1, 2)" in text
    assert "- 90.32 % at 0.390 bits: BELOW — no point" in text
    assert "| 0.7 | 0.699 | 91.10 ± 0.12 | 89.50 |" in text


def test_a_single_seed_has_no_spread(study):
    rows = [row(0.5, 0.499, 0.9130)]
    text = protocol_table(study, rows)

    assert "| 0.5 | 0.499 | 91.30 | 89.50 |" in text
    assert "Against the authors'" not in study.markdown("vgg", "fmnist_vgg_small", rows, RUNS, [])
    assert "- 90.99 % at 0.516 bits: on or above — 91.30 % at 0.499 bits (seed 0)" in text


def test_markdown_names_the_commit_of_every_run(study):
    """The provenance line groups runs (target bits/seed) under the short commit each ran at, first seen first."""
    runs = [{**RUNS[0], "target_bits": t, "seed": s, "git_commit": c and c * 40}
            for t, s, c in [(0.7, 0, "a"), (0.7, 1, "b"), (0.5, 0, "a"), (0.5, 1, None)]]
    text = study.markdown("lenet5", "fmnist_lenet5_protocol", [row(0.7, 0.699, 0.911)], runs, [])

    assert ("Runs (target bits/seed) by the commit they ran at: `aaaaaaa` (0.7/0, 0.5/0); `bbbbbbb` (0.7/1); "
            "unrecorded commit (0.5/1).") in text
