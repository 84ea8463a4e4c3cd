"""Bit and storage accounting (§1): binary bits Σ I_g·n, storage with coordinates and metadata, average bits."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alq_lightning.core import COORD_BITS, LayerBits, MultiBitState, average_bits, check_coord_bits


@given(
    seed=st.integers(0, 2**31 - 1),
    num_groups=st.integers(1, 20),
    max_bits=st.integers(1, 8),
    group_size=st.integers(1, 50),
    coord_bits=st.sampled_from(COORD_BITS),
)
@settings(max_examples=40, deadline=None)
def test_layer_bits_against_loops(seed, num_groups, max_bits, group_size, coord_bits):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(num_groups, max_bits, generator=gen) < torch.rand(1, generator=gen)
    bits = LayerBits.of(mask, group_size)
    per_group = [sum(bool(m) for m in row) for row in mask.tolist()]  # I_g
    binary = sum(i * group_size for i in per_group)
    live = sum(per_group)
    assert (bits.numel, bits.num_groups, bits.group_size, bits.max_bits, bits.live_slots) == (
        num_groups * group_size, num_groups, group_size, max_bits, live
    )
    assert bits.binary_bits == binary
    assert bits.avg_bits == binary / (num_groups * group_size)
    mask_bits = num_groups * max_bits  # one live bit per slot
    assert bits.storage_bits(coord_bits) == binary + live * coord_bits + mask_bits
    assert bits.storage_bytes(coord_bits) == math.ceil(binary / 8) + live * coord_bits // 8 + math.ceil(mask_bits / 8)
    codes = torch.zeros(num_groups, group_size, dtype=torch.uint8)
    state = MultiBitState(codes, torch.rand(num_groups, max_bits), mask)
    assert state.bits() == binary and state.bits_per_group().tolist() == per_group


def test_figures():
    # 10 groups of 25 weights, 6 slots; I_g = 0, 1, ..., 5, 0, 1, 2, 3 -> Σ I_g = 21
    mask = torch.tensor([[k < i for k in range(6)] for i in [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    bits = LayerBits.of(mask, 25)
    assert bits.binary_bits == 525 and bits.avg_bits == 2.1
    assert bits.storage_bits() == 525 + 21 * 32 + 60 == bits.storage_bits(32)
    assert bits.storage_bits(16) == 525 + 21 * 16 + 60
    assert bits.storage_bytes() == 66 + 84 + 8
    assert all(type(bits.storage_bytes(c)) is int for c in COORD_BITS), "a whole number of bytes"
    other = LayerBits.of(torch.zeros(4, 6, dtype=torch.bool), 250)  # fully pruned layer of 1000 weights
    assert other.binary_bits == 0 and other.storage_bits() == 24
    assert average_bits([bits, other]) == pytest.approx(525 / 1250, rel=1e-15)


@given(layers=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 30), st.integers(0, 1000)),
                       min_size=1, max_size=5))
@settings(max_examples=30, deadline=None)
def test_average_bits_is_ratio_of_sums(layers):
    stats = []
    for g, k, n, seed in layers:
        mask = torch.rand(g, k, generator=torch.Generator().manual_seed(seed)) < 0.5
        stats.append(LayerBits.of(mask, n))
    total_bits = sum(int(m.live_slots) * m.group_size for m in stats)
    total_weights = sum(m.num_groups * m.group_size for m in stats)
    assert average_bits(stats) == pytest.approx(total_bits / total_weights, rel=1e-15)


def test_average_bits_needs_a_layer():
    with pytest.raises(ValueError, match="layer"):
        average_bits([])


@pytest.mark.parametrize("coord_bits", [0, 8, 64, 31, "32", None, 32.5])
def test_coord_bits_must_be_16_or_32(coord_bits):
    bits = LayerBits.of(torch.ones(2, 2, dtype=torch.bool), 4)
    for call in (check_coord_bits, bits.storage_bits, bits.storage_bytes):
        with pytest.raises(ValueError, match=r"coord_bits.*16.*32"):
            call(coord_bits)
    assert check_coord_bits(16) == 16 and check_coord_bits(32) == 32
