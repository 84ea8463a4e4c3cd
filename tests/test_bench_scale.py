"""bench/bench_scale.py on a tiny GPT: the sharded fit holds half of DDP's ALQ state per process."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = {"vocab": 64, "dim": 32, "layers": 1, "heads": 2, "context": 16, "batch_size": 2, "steps": 4, "max_bits": 3,
        "target_bits": 1.5, "lr": 1e-3, "optimizer": "float"}


@pytest.fixture
def bench_scale(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("common", "bench_scale"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield importlib.import_module("bench_scale")
    for name in ("common", "bench_scale"):
        sys.modules.pop(name, None)


@pytest.mark.slow
def test_each_sharded_process_holds_half_the_alq_state_of_a_ddp_process(bench_scale):
    runs = {strategy: bench_scale.run(strategy, TINY) for strategy in ("fsdp2", "ddp")}
    summary = bench_scale.summarise(runs)
    ddp, fsdp2 = summary["per_rank_max"]["ddp"], summary["per_rank_max"]["fsdp2"]
    weights = 64 * 32 + 16 * 32 + 12 * 32 * 32 + 32 * 64  # embeddings, qkv + proj + fc1 + fc2, head
    assert ddp["quantized_weights"] == fsdp2["quantized_weights"] == weights
    assert all(rank["steps"] == TINY["steps"] for ranks in runs.values() for rank in ranks)
    # Every matrix has an even number of rows: each process holds half of every layer's groups; what is not halved
    # is per layer (step counters, learning rates), a few hundred bytes.
    for rank in runs["fsdp2"]:
        assert abs(rank["alq_state_bytes"] - ddp["alq_state_bytes"] / 2) <= 0.02 * ddp["alq_state_bytes"]
    # the parameters, their gradients and AdamW's state (of the float parameters) are halved too
    assert summary["fsdp2_over_ddp"]["model_bytes"] <= 0.55
    assert summary["fsdp2_over_ddp"]["alq_and_model_bytes"] <= bench_scale.ACCEPTANCE and summary["accepted"]
    assert ddp["avg_bits"] <= TINY["target_bits"] and fsdp2["avg_bits"] <= TINY["target_bits"]
