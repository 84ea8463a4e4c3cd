"""bench/peers.py: the byte accounting of the peers, the quantized-weights check, and (with the ``peers`` extra:
torchao, brevitas) that a peer trained from Lightning really sees quantized weights in its forward."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn


@pytest.fixture
def peer_bytes(bench_module):
    return bench_module("peer_bytes")


@pytest.fixture
def peer_methods(bench_module):
    bench_module("peer_bytes")
    yield bench_module("peer_methods")
    sys.modules.pop("peer_bytes", None)


def test_lsbq_rows_store_codes_and_b_scales_per_row(peer_bytes):
    """b-bit LSBQ per row of a [n, d] matrix: n·d·b bits of codes + n·b float32 scales, so b + 32·b/d bits."""
    n, d = 384, 128
    for bits in (1, 2):
        coded = peer_bytes.CodedTensor("w", n * d, peer_bytes.groups_of((n, d), None), bits, bits)
        assert coded.code_bytes == n * d * bits // 8
        assert coded.scale_bytes == n * bits * 4
        record = peer_bytes.peer_storage([coded], remainder=100)
        assert record["model_bytes"] == coded.bytes + 100
        assert record["stored_bits"] == bits + 32 * bits / d  # exact: powers of two
        assert record["code_bits"] == bits


def test_blocks_tile_rows_and_odd_codes_round_up(peer_bytes):
    assert peer_bytes.groups_of((512, 128), 64) == 1024
    assert peer_bytes.groups_of((20, 1, 5, 5), None) == 20
    with pytest.raises(ValueError, match="row length 25"):
        peer_bytes.groups_of((20, 1, 5, 5), 64)
    # 3 ternary codes of 2 bits: 6 bits still take a whole byte; two tensors' code bits average by weights
    small = peer_bytes.CodedTensor("a", 3, 1, 2, 1)
    assert small.bytes == 1 + 4
    big = peer_bytes.CodedTensor("b", 8, 2, 1, 1)
    assert peer_bytes.peer_storage([small, big], 0)["code_bits"] == (3 * 2 + 8 * 1) / 11
    with pytest.raises(ValueError, match="groups=2"):
        peer_bytes.CodedTensor("c", 5, 2, 1, 1)


def test_remainder_counts_everything_else_at_its_dtype(peer_bytes):
    state = {"w": torch.zeros(4, 4), "b": torch.zeros(4), "h": torch.zeros(3, dtype=torch.float16),
             "n": torch.zeros(2, dtype=torch.int64)}
    assert peer_bytes.remainder_bytes(state, ["w"]) == 16 + 6 + 16
    with pytest.raises(KeyError, match="missing"):
        peer_bytes.remainder_bytes(state, ["missing"])


def test_max_levels_per_row_and_per_block(peer_bytes):
    w = torch.tensor([[1.0, -1.0, 1.0, -1.0], [0.5, 0.0, -0.5, 0.5]])
    assert peer_bytes.max_levels(w, None) == 3
    assert peer_bytes.max_levels(w, 2) == 2  # blocks [1,-1] [1,-1] [.5,0] [-.5,.5]
    assert peer_bytes.max_levels(torch.randn(6, 8), None) == 8
    # p - (p - v·sign(p)) as PARQ forms it: one level per sign, though not bit-equal to ±v
    p = torch.randn(5, 64)
    v = p.abs().mean(dim=1, keepdim=True)
    assert peer_bytes.max_levels(p - (p - v * torch.sign(p)), None) == 2
    assert peer_bytes.max_levels(torch.tensor([[1.0, 1.0 + 1e-3]]), None) == 2


def test_check_quantized_refuses_a_float_weight(peer_methods):
    peer = next(p for p in peer_methods.peers() if p.name == "PARQ LSBQ 1-bit row hard")
    model = nn.Linear(8, 4)
    with torch.no_grad():
        model.weight.copy_(torch.where(torch.randn(4, 8) > 0, 0.5, -0.5))
    assert peer_methods.check_quantized(model, ["weight"], peer) == 2
    with torch.no_grad():
        model.weight[0, 0] = 0.25
    with pytest.raises(RuntimeError, match="3 distinct values, more than 2"):
        peer_methods.check_quantized(model, ["weight"], peer)


def forward_levels(peer_methods, bench_module, name: str, steps: int = 6) -> list[int]:
    """Trains a tiny causal transformer with peer ``name`` through Lightning; the most distinct values in a group
    of any quantized weight as each training forward saw it."""
    import lightning as L

    char_lm = bench_module("char_lm")
    peer = next(p for p in peer_methods.peers() if p.name == name)
    torch.manual_seed(0)
    model = char_lm.CharTransformer(16, dim=64, layers=1, heads=2, ffn=128, context=8)
    names = list(char_lm.weight_matrices(model))
    module = peer_methods.PeerLM(model, peer, names, lr=1e-2, total_steps=steps)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(max(
        peer_methods.max_levels(peer_methods.forward_weight(m, n), peer.block) for n in names)) if m.training
        else None)
    data = char_lm.RandomWindows(torch.randint(0, 16, (200,)), 8, 4, steps, seed=0)
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(
        module, torch.utils.data.DataLoader(data, batch_size=None))
    return seen


@pytest.mark.parametrize("name", ["PARQ LSBQ 1-bit row hard", "PARQ LSBQ 2-bit block 64 hard",
                                  "PARQ Unif 2-bit row hard"])
def test_parq_trains_on_quantized_weights(peer_methods, bench_module, name):
    """After PARQ's first step every training forward sees at most 2^bits values per row / block."""
    pytest.importorskip("torchao")
    seen = forward_levels(peer_methods, bench_module, name)
    levels = next(p.levels for p in peer_methods.peers() if p.name == name)
    assert len(seen) == 6 and seen[0] > levels  # the float start, then quantized
    assert all(count <= levels for count in seen[1:]), seen


@pytest.mark.parametrize("name", ["Brevitas binary row", "Brevitas ternary row"])
def test_brevitas_trains_on_quantized_weights(peer_methods, bench_module, name):
    pytest.importorskip("brevitas")
    seen = forward_levels(peer_methods, bench_module, name)
    levels = next(p.levels for p in peer_methods.peers() if p.name == name)
    assert len(seen) == 6 and all(count <= levels for count in seen), seen


def test_best_points_sweep_alq_per_target_like_the_peers(bench_module):
    """The README's point of each peer and of each ALQ target is its run of lowest validation loss over the
    learning rates; ALQ targets are separate points, the float control none."""
    peers = bench_module("peers")
    runs = [{"method": "float control", "val_loss": 1.8},
            {"method": "ALQ", "target_bits": 1.0, "lr": 1e-3, "val_loss": 2.3},
            {"method": "ALQ", "target_bits": 2.0, "lr": 1e-3, "val_loss": 1.96},
            {"method": "ALQ", "target_bits": 1.0, "lr": 3e-3, "val_loss": 2.2},
            {"method": "ALQ", "target_bits": 2.0, "lr": 3e-3, "val_loss": 1.99},
            {"method": "ALQ per_bit", "target_bits": 1.0, "lr": 1e-3, "val_loss": 2.39},
            {"method": "PARQ", "lr": 1e-3, "val_loss": 2.17},
            {"method": "PARQ", "lr": 3e-3, "val_loss": 2.11}]
    best = {(p["method"], p.get("target_bits")): p["lr"] for p in peers.best_points(runs)}
    assert best == {("ALQ", 1.0): 3e-3, ("ALQ", 2.0): 1e-3, ("ALQ per_bit", 1.0): 1e-3, ("PARQ", None): 3e-3}
