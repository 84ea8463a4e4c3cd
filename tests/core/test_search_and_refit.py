"""AMSGrad statistics (§3), the nearest-pattern search and the weighted refit (§4) against oracles."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alq_lightning.core import (
    AmsgradStats,
    MultiBitState,
    QuadraticConfig,
    all_patterns,
    count_below,
    nearest_patterns,
    quadratic_model,
    refit_coords,
    update_stats,
)
from alq_lightning.core.multibit import row_blocks
from alq_lightning.core.steps import FEW_BOUNDS

from step_oracles import (
    CONFIG,
    F64,
    amsgrad_tensors,
    brute_nearest,
    decode,
    pack,
    random_state,
    weighted_error,
    wls_oracle,
)


def test_update_stats_and_quadratic_model_follow_recurrence():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, generator=gen, dtype=F64) * (t + 1) for t in range(6)]
    grads[-1] = grads[-1] * 0.01  # v falls on the last step: v̄ must keep the maximum
    stats = AmsgradStats.zeros_like(grads[0])
    for t, g in enumerate(grads, start=1):
        update_stats(stats, g, CONFIG)
        m, v, vmax, p, h = amsgrad_tensors(grads[:t], lr=0.3)
        for got, want in ((stats.m, m), (stats.v, v), (stats.vmax, vmax)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        got_p, got_h = quadratic_model(stats, t, 0.3, CONFIG)
        torch.testing.assert_close(got_p, p, rtol=1e-12, atol=0)
        torch.testing.assert_close(got_h, h, rtol=1e-12, atol=0)
    assert bool((stats.vmax > stats.v).any()), "the case exercises v̄ > v"


@pytest.mark.parametrize("step", [0, -1])
def test_quadratic_model_needs_a_step(step):
    stats = AmsgradStats.zeros_like(torch.zeros(2))
    with pytest.raises(ValueError, match="step"):
        quadratic_model(stats, step, 1e-3, CONFIG)


@pytest.mark.parametrize("kwargs", [{"beta1": 1.0}, {"beta2": -0.1}, {"eps": 0.0}])
def test_quadratic_config_validation(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        QuadraticConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"beta1": 0.0}, {"beta2": 0.0}, {"beta1": 0.999999}, {"eps": 1e-12}, {}])
def test_quadratic_config_accepts_the_documented_ranges(kwargs):
    """``beta1, beta2`` in ``[0, 1)`` and any ``eps > 0`` are valid (``beta = 0``: no averaging)."""
    config = QuadraticConfig(**kwargs)
    assert all(getattr(config, key) == value for key, value in kwargs.items())


def test_stats_reset():
    stats = AmsgradStats.zeros_like(torch.zeros(3))
    update_stats(stats, torch.ones(3), CONFIG)
    stats.reset()
    assert all(torch.equal(t, torch.zeros(3)) for t in (stats.m, stats.v, stats.vmax))


# ----------------------------------------------------------------------------------------------- patterns
@pytest.mark.parametrize("max_bits", range(1, 9))
def test_all_patterns_and_bases_round_trip(max_bits):
    patterns = all_patterns(max_bits, F64)
    assert patterns.shape == (2**max_bits, max_bits)
    for i in range(2**max_bits):
        assert patterns[i].tolist() == [1.0 if (i >> k) & 1 else -1.0 for k in range(max_bits)]
    bases = patterns.T[None].to(torch.int8)  # one group whose weights take every pattern once
    state = MultiBitState(pack(bases), torch.ones(1, max_bits, dtype=F64), torch.ones(1, max_bits, dtype=torch.bool))
    assert state.codes.tolist() == [list(range(2**max_bits))]
    assert state.bases.dtype == torch.int8 and torch.equal(state.bases, bases)
    assert torch.equal(MultiBitState.from_bases(bases, state.coords, state.mask).codes, state.codes)
    assert state.reconstruct()[0].tolist() == patterns.sum(dim=1).tolist()


def test_from_bases_reads_signs_with_zero_as_plus_one():
    bases = torch.tensor([[[0.0, 0.5, -0.25, 3.0], [-1.0, 0.0, 1.0, -0.0]]])
    state = MultiBitState.from_bases(bases, torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool))
    assert state.bases.tolist() == [[[1, 1, -1, 1], [-1, 1, 1, 1]]]
    assert state.codes.dtype == torch.uint8


@given(num_groups=st.integers(0, 40), group_size=st.integers(1, 20), block=st.integers(1, 100))
@settings(max_examples=60, deadline=None)
def test_row_blocks_are_the_largest_whole_group_blocks_within_the_budget(num_groups, group_size, block):
    """Consecutive slices cover every group once; each holds as many whole groups as fit in ``block`` weights
    (at least one), only the last may hold fewer."""
    slices = row_blocks(num_groups, group_size, block)
    covered = [g for part in slices for g in range(num_groups)[part]]
    assert covered == list(range(num_groups))
    rows = max(1, block // group_size)
    assert all(len(range(num_groups)[part]) == rows for part in slices[:-1])
    assert rows == 1 or rows * group_size <= block < (rows + 1) * group_size


def pattern_value(coords, index, max_bits):
    return sum(float(coords[k]) * (1 if (index >> k) & 1 else -1) for k in range(max_bits))


@given(
    seed=st.integers(0, 2**31 - 1),
    num_groups=st.integers(1, 3),
    group_size=st.integers(1, 6),
    max_bits=st.integers(1, 8),
    grid=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_nearest_patterns_equals_brute_force(seed, num_groups, group_size, max_bits, grid):
    gen = torch.Generator().manual_seed(seed)
    if grid:  # exact binary fractions: ties between coordinates, exactly representable and midpoint targets
        coords = torch.randint(0, 4, (num_groups, max_bits), generator=gen).to(F64) * 0.25
        target = torch.randint(-20, 21, (num_groups, group_size), generator=gen).to(F64) * 0.125
    else:
        coords = torch.rand(num_groups, max_bits, generator=gen, dtype=F64)
        tied = torch.rand(num_groups, max_bits, generator=gen) < 0.3  # equal coordinates: tied pattern values
        coords = torch.where(tied, coords[:, :1], coords)
        target = torch.randn(num_groups, group_size, generator=gen, dtype=F64) * coords.sum(dim=1, keepdim=True)
    dead = torch.rand(num_groups, max_bits, generator=gen) < 0.3
    live = coords.masked_fill(dead, 0)
    index = nearest_patterns(live, target)
    assert index.dtype == torch.int64 and index.shape == target.shape
    assert bool(((index >= 0) & (index < 2**max_bits)).all())
    for g in range(num_groups):
        for j in range(group_size):
            t = float(target[g, j])
            best, minimisers = brute_nearest(live[g].tolist(), [True] * max_bits, t)
            got = pattern_value(live[g], int(index[g, j]), max_bits)
            assert abs(abs(got - t) - best) <= 1e-12
            values = {v for v, _ in minimisers}
            assert got == pytest.approx(min(values), abs=1e-12), "on a tie the smaller value wins"
            if len(minimisers) == 1:
                assert decode(index[g, j], max_bits) == minimisers[0][1]


@given(
    seed=st.integers(0, 2**31 - 1),
    num_groups=st.integers(1, 3),
    num_bounds=st.integers(0, 300),
    group_size=st.integers(0, 40),
)
@settings(max_examples=60, deadline=None)
def test_count_below_equals_sorted_search(seed, num_groups, num_bounds, group_size):
    gen = torch.Generator().manual_seed(seed)
    bounds = torch.randint(-8, 9, (num_groups, num_bounds), generator=gen).to(F64).sort(dim=1).values / 4
    target = torch.randint(-40, 41, (num_groups, group_size), generator=gen).to(F64) / 8  # hits bounds exactly
    got = count_below(bounds, target)
    assert got.dtype == torch.int64
    assert torch.equal(got, (bounds[:, None, :] < target[:, :, None]).sum(dim=2))
    assert torch.equal(got, torch.searchsorted(bounds, target))


@pytest.mark.parametrize("num_bounds", range(FEW_BOUNDS + 3))
def test_count_below_compares_few_bounds_and_halves_many_alike(num_bounds):
    """Both searches (every bound compared, up to ``FEW_BOUNDS``; halving beyond) count strictly-below bounds,
    ties and infinities included."""
    gen = torch.Generator().manual_seed(num_bounds)
    bounds = torch.randint(-4, 5, (3, num_bounds), generator=gen).to(F64).sort(dim=1).values / 4
    target = torch.cat([torch.randint(-20, 21, (3, 60), generator=gen).to(F64) / 8,
                        torch.tensor([[-torch.inf, torch.inf]], dtype=F64).expand(3, 2)], dim=1)
    got = count_below(bounds, target)
    assert got.dtype == torch.int64
    assert torch.equal(got, (bounds[:, None, :] < target[:, :, None]).sum(dim=2))


def test_nearest_patterns_hand_cases():
    live = torch.tensor([[1.0, 0.25]], dtype=F64)  # values -1.25, -0.75, 0.75, 1.25
    target = torch.tensor([[-9.0, -1.0, 0.0, 0.7, 1.0, 1.3, 9.0]], dtype=F64)
    index = nearest_patterns(live, target)
    values = [pattern_value(live[0], int(i), 2) for i in index[0]]
    assert values == [-1.25, -1.25, -0.75, 0.75, 0.75, 1.25, 1.25]  # -1.0 and 1.0 are ties: smaller value


@pytest.mark.parametrize("max_bits", [1, 4, 8])
def test_nearest_patterns_all_dead_group(max_bits):
    index = nearest_patterns(torch.zeros(2, max_bits, dtype=F64), torch.randn(2, 5, dtype=F64))
    assert bool(((index >= 0) & (index < 2**max_bits)).all())


# ----------------------------------------------------------------------------------------------- refit
@given(
    seed=st.integers(0, 2**31 - 1),
    num_groups=st.integers(1, 4),
    group_size=st.integers(1, 12),
    max_bits=st.integers(1, 8),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
@settings(max_examples=50, deadline=None)
def test_refit_coords_equals_weighted_least_squares(seed, num_groups, group_size, max_bits, dtype):
    gen = torch.Generator().manual_seed(seed)
    state = random_state(gen, num_groups, max_bits, group_size)
    target = torch.randn(num_groups, group_size, generator=gen, dtype=F64)
    weight = torch.rand(num_groups, group_size, generator=gen, dtype=F64) * 3 + 0.01
    coords = refit_coords(state.codes, state.mask, target.to(dtype), weight.to(dtype))
    assert coords.dtype == dtype and torch.isfinite(coords).all()
    assert bool((coords[~state.mask] == 0).all())
    oracle = wls_oracle(state.bases, state.mask, target, weight)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    objective = weighted_error(state.bases, coords.double(), state.mask, target, weight)
    best = weighted_error(state.bases, oracle, state.mask, target, weight)
    baseline = (weight * target**2).sum(dim=1).numpy()
    assert np.all(objective <= best + tol * baseline + 1e-12)
    for g in range(num_groups):
        design = state.bases[g][state.mask[g]].double().T.numpy()
        if design.shape[1] and np.linalg.matrix_rank(design) == design.shape[1] and np.linalg.cond(design) < 100:
            np.testing.assert_allclose(coords[g].double().numpy(), oracle[g], rtol=0, atol=tol * 100)


def test_refit_coords_hand_case():
    bases = torch.tensor([[[1, 1, 1], [1, -1, 1]]], dtype=torch.int8)
    target = torch.tensor([[3.0, 1.0, 2.0]], dtype=F64)
    weight = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    # normal equations: [[6, 2], [2, 6]] α = [3+2+6, 3-2+6] = [11, 7] -> α = (52/32, 20/32)
    coords = refit_coords(pack(bases), torch.tensor([[True, True]]), target, weight)
    torch.testing.assert_close(coords, torch.tensor([[1.625, 0.625]], dtype=F64), rtol=1e-12, atol=0)
    # one dead slot: α_0 = (3 + 2 + 6) / 6
    coords = refit_coords(pack(bases), torch.tensor([[True, False]]), target, weight)
    torch.testing.assert_close(coords, torch.tensor([[11 / 6, 0.0]], dtype=F64), rtol=1e-12, atol=0)
    assert refit_coords(pack(bases), torch.tensor([[False, False]]), target, weight).tolist() == [[0.0, 0.0]]


# ----------------------------------------------------------------------------------------------- fit_bases
