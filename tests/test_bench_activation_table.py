"""The weights × inputs table of multi-bit activation studies (bench/activation_table.py)."""
from __future__ import annotations

import json

import pytest


def run(target: float, seed: int, acc: float, bops: int | None = None) -> dict:
    return {"seed": seed, "target_bits": target, "test_acc": acc, "float_test_acc": 0.895, "avg_bits": target - 1e-4,
            "storage_bytes": {"coords32": 2048 * target, "float32": 4096},
            "activations": None if bops is None else {"act_bits": {"fc": 2}, "bops": bops, "macs": 2_000_000}}


def write(folder, name: str, runs: list[dict]) -> None:
    (folder / f"{name}.json").write_text(json.dumps({"runs": runs}))


def test_cells_land_under_their_weights_and_input_bits(bench_module, tmp_path):
    study = bench_module("activation_table")
    write(tmp_path, "m_weights_only", [run(1.0, 0, 0.91), run(0.7, 0, 0.905), run(0.4, 0, 0.90)])
    write(tmp_path, "m_act2_start", [run(1.0, 0, 0.89, 4_100_000), run(1.0, 1, 0.87, 3_900_000)])
    write(tmp_path, "m_act3_start", [run(0.4, 0, 0.885, 2_500_000)])
    lines = study.table("m", "m_weights_only", tmp_path).splitlines()
    assert "seeds 0, 1." in lines[0]
    assert lines[2] == "| weights | storage | float inputs (2.0 M MACs) | 1-bit inputs | 2-bit inputs | 3-bit inputs |"
    assert lines[4] == "| float32 | 4.0 KiB | 89.50 % | — | — | — |"
    assert lines[5] == "| 1.000 bits | 2.0 KiB | 91.00 % | — | 88.00 ± 1.41 % (4.0 M) | — |"
    assert lines[6] == "| 0.400 bits | 0.8 KiB | 90.00 % | — | — | 88.50 % (2.5 M) |"
    assert len(lines) == 7, "no row for a weight target that no input study ran"


def test_no_study_is_refused_with_the_folder(bench_module, tmp_path):
    write(tmp_path, "m_weights_only", [run(1.0, 0, 0.91)])
    with pytest.raises(SystemExit, match="no input study of .m. \\(m_act<J>_start.json\\) in"):
        bench_module("activation_table").table("m", "m_weights_only", tmp_path)
