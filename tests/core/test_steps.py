"""The loss-aware steps (§4): fit of bases, basis, coordinate and STE steps, against oracles."""
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alq_lightning.core import (
    AmsgradStats,
    MultiBitState,
    basis_step,
    coordinate_step,
    fit_bases,
    greedy_init,
    project_grad,
    rederive_coord_stats,
    refit_coords,
    ste_step,
)

from step_oracles import (
    CONFIG,
    EPS,
    F64,
    amsgrad_tensors,
    assert_fit_matches,
    check_state,
    clone,
    coordinate_oracle,
    expect_coord_stats,
    fit_oracle,
    pack,
    random_state,
    reconstruct,
    weighted_error,
)


def test_fit_bases_equals_brute_force_and_never_fits_worse():
    """Per example: never fits worse than the start, masks kept; where every weight has one nearest live pattern
    (almost always for random coordinates), equal to the brute-force fit; that comparison ran for most examples."""
    compared = []

    @given(
        seed=st.integers(0, 2**31 - 1),
        num_groups=st.integers(1, 3),
        group_size=st.integers(1, 8),
        max_bits=st.integers(1, 6),
    )
    @settings(max_examples=40, deadline=None, database=None)
    def check(seed, num_groups, group_size, max_bits):
        gen = torch.Generator().manual_seed(seed)
        state = random_state(gen, num_groups, max_bits, group_size)
        target = torch.randn(num_groups, group_size, generator=gen, dtype=F64) * 2
        weight = torch.rand(num_groups, group_size, generator=gen, dtype=F64) + 0.05
        old = clone(state)
        fit_bases(state, target, weight)
        check_state(state)
        bases, coords, unique = fit_oracle(old.coords.numpy(), old.mask.numpy(), target.numpy(), weight.numpy())
        if unique:
            assert_fit_matches(state, bases, coords, old.mask, target, weight)
        compared.append(unique)
        # never fits worse than the state it started from (new patterns are per-weight nearest, refit is optimal)
        new_err = weighted_error(state.bases, state.coords, state.mask, target, weight)
        old_err = weighted_error(old.bases, old.coords, old.mask, target, weight)
        assert np.all(new_err <= old_err * (1 + 1e-9) + 1e-12)
        assert torch.equal(state.mask, old.mask)

    check()
    assert len(compared) >= 40 and sum(compared) >= 0.8 * len(compared), "the brute-force comparison rarely ran"


@given(seed=st.integers(0, 2**31 - 1), group_size=st.integers(2, 10), max_bits=st.integers(1, 6))
@settings(max_examples=30, deadline=None)
def test_fit_bases_never_worse_than_refit_old_bases(seed, group_size, max_bits):
    """Starting from coordinates already refit to the target, keeping the old bases cannot fit better."""
    gen = torch.Generator().manual_seed(seed)
    state = random_state(gen, 3, max_bits, group_size)
    target = torch.randn(3, group_size, generator=gen, dtype=F64)
    weight = torch.rand(3, group_size, generator=gen, dtype=F64) + 0.05
    coords = refit_coords(state.codes, state.mask, target, weight)
    bases = state.bases * torch.where(coords < 0, -1, 1).to(torch.int8)[:, :, None]
    state = MultiBitState(pack(bases), coords.abs(), state.mask)
    kept_err = weighted_error(state.bases, state.coords, state.mask, target, weight)
    fit_bases(state, target, weight)
    new_err = weighted_error(state.bases, state.coords, state.mask, target, weight)
    assert np.all(new_err <= kept_err * (1 + 1e-9) + 1e-12)


def test_fit_bases_reproduces_representable_target():
    state = greedy_init(torch.randn(5, 7, dtype=F64, generator=torch.Generator().manual_seed(1)), 3)
    target = state.reconstruct()
    before = clone(state)
    fit_bases(state, target, torch.ones_like(target))
    torch.testing.assert_close(state.reconstruct(), target, rtol=0, atol=1e-12)
    torch.testing.assert_close(state.coords, before.coords, rtol=1e-10, atol=1e-12)


def test_fit_bases_searches_at_the_targets_precision():
    """float32 coordinates, float64 target: a weight 1e-9 above a midpoint (a tie once rounded to float32) still
    gets the nearer pattern, as in the float64 brute-force fit."""
    coords = torch.tensor([[1.0, 0.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    target = torch.tensor([[1.0 + 1e-9, 0.5, -0.5, -1.5, -1.0 - 1e-9]], dtype=F64)  # values ±0.5, ±1.5
    weight = torch.ones_like(target)
    bases, refit, unique = fit_oracle(coords.double().numpy(), mask.numpy(), target.numpy(), weight.numpy())
    assert unique
    state = MultiBitState(torch.zeros(1, 5, dtype=torch.uint8), coords.clone(), mask.clone())
    fit_bases(state, target, weight)
    assert state.bases.tolist() == bases.astype(int).tolist()
    np.testing.assert_allclose(reconstruct(state.bases, state.coords, state.mask), reconstruct(bases, refit, mask),
                               rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- basis step
def seeded_layer(seed, num_groups=4, group_size=6, max_bits=4, prune=True):
    gen = torch.Generator().manual_seed(seed)
    state = greedy_init(torch.randn(num_groups, group_size, generator=gen, dtype=F64), max_bits)
    if prune:  # a few pruned slots, one fully pruned group
        state.mask[0, -1] = False
        state.mask[-1] = False
    return state, gen


@pytest.mark.parametrize("seed", range(4))
def test_basis_step_equals_hand_oracle(seed):
    state, gen = seeded_layer(seed)
    num_groups, max_bits, n = state.bases.shape
    weight_stats = AmsgradStats.zeros_like(torch.zeros(num_groups, n, dtype=F64))
    coord_stats = AmsgradStats.zeros_like(torch.zeros(num_groups, max_bits, dtype=F64))
    grads, lr = [], 0.05
    for step in (1, 2, 3):
        grads.append(torch.randn(num_groups, n, generator=gen, dtype=F64))
        old = clone(state)
        basis_step(state, weight_stats, coord_stats, grads[-1], step, lr, CONFIG)
        m, v, vmax, p, h = amsgrad_tensors(grads, lr)
        for got, want in ((weight_stats.m, m), (weight_stats.v, v), (weight_stats.vmax, vmax)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        target = reconstruct(old.bases, old.coords, old.mask) - (p / h).numpy()
        bases, coords, unique = fit_oracle(old.coords.numpy(), old.mask.numpy(), target, h.numpy())
        assert unique
        assert_fit_matches(state, bases, coords, old.mask, torch.from_numpy(target), h)
        check_state(state)
        assert torch.equal(state.mask, old.mask)
        expect_coord_stats(state, weight_stats, coord_stats)


def test_rederive_coord_stats():
    state, gen = seeded_layer(7)
    weight_stats = AmsgradStats(*(torch.randn(4, 6, generator=gen, dtype=F64).abs() for _ in range(3)))
    weight_stats.m.neg_()
    coord_stats = AmsgradStats.zeros_like(torch.zeros(4, 4, dtype=F64))
    rederive_coord_stats(state, weight_stats, coord_stats)
    expect_coord_stats(state, weight_stats, coord_stats)


def test_project_grad():
    state, gen = seeded_layer(8)
    grad = torch.randn(4, 6, generator=gen, dtype=F64)
    got = project_grad(state, grad)
    for g, k in itertools.product(range(4), range(4)):
        want = sum(int(state.bases[g, k, j]) * float(grad[g, j]) for j in range(6)) if state.mask[g, k] else 0.0
        assert float(got[g, k]) == pytest.approx(want, rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------------------------------- coordinate step
@given(
    seed=st.integers(0, 2**31 - 1),
    num_groups=st.integers(1, 3),
    group_size=st.integers(1, 6),
    max_bits=st.integers(1, 8),
    lr=st.sampled_from([1e-3, 0.1, 1.0]),
)
@settings(max_examples=30, deadline=None)
def test_coordinate_step_equals_hand_oracle(seed, num_groups, group_size, max_bits, lr):
    gen = torch.Generator().manual_seed(seed)
    state = random_state(gen, num_groups, max_bits, group_size)
    state.coords[~state.mask] = 0.5  # a pruned slot may keep a stale coordinate: it must stay untouched
    start = clone(state)
    # statistics from earlier steps, also on slots pruned since: a dead slot must not move even if m_α != 0
    v = torch.rand(num_groups, max_bits, generator=gen, dtype=F64)
    m = torch.randn(num_groups, max_bits, generator=gen, dtype=F64)
    stats = AmsgradStats(m, v, v + torch.rand(v.shape, generator=gen, dtype=F64))
    start_stats = AmsgradStats(stats.m.clone(), stats.v.clone(), stats.vmax.clone())
    grads = [torch.randn(num_groups, group_size, generator=gen, dtype=F64) for _ in range(3)]
    for t, grad in enumerate(grads, start=3):
        coordinate_step(state, stats, grad, t, lr, CONFIG)
    coords, bases, m, v, vmax = coordinate_oracle(start, start_stats, grads, lr, first_step=3)
    np.testing.assert_allclose(state.coords.numpy(), coords, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(state.bases.numpy(), bases)
    np.testing.assert_allclose(stats.m.numpy(), m, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(stats.v.numpy(), v, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(stats.vmax.numpy(), vmax, rtol=1e-10, atol=1e-15)
    assert bool((state.coords >= 0).all())
    assert torch.equal(state.coords[~state.mask], start.coords[~start.mask])
    assert torch.equal(state.bases[~state.mask], start.bases[~start.mask])
    assert torch.equal(state.mask, start.mask)


def test_coordinate_step_flip_negates_first_moment():
    bases = torch.tensor([[[1, 1, 1, 1], [1, -1, 1, -1], [-1, 1, 1, -1]]], dtype=torch.int8)
    state = MultiBitState(pack(bases), torch.tensor([[0.01, 1.0, 0.5]], dtype=F64), torch.tensor([[True, True, False]]))
    stats = AmsgradStats.zeros_like(state.coords)
    grad = torch.full((1, 4), 2.0, dtype=F64)  # g_α = (8, 0, dead)
    coordinate_step(state, stats, grad, 1, 1.0, CONFIG)
    step = (0.1 * 8 / 0.1) / ((math.sqrt(0.001 * 64) + EPS) / math.sqrt(0.001))  # p / h at t = 1
    assert float(state.coords[0, 0]) == pytest.approx(step - 0.01, rel=1e-12)  # 0.01 - p/h < 0, flipped
    assert state.bases[0, 0].tolist() == [-1, -1, -1, -1]
    assert float(stats.m[0, 0]) == pytest.approx(-0.8, rel=1e-12)  # m = 0.1 · 8, negated by the flip
    assert float(stats.v[0, 0]) == pytest.approx(0.064, rel=1e-12) and float(stats.vmax[0, 0]) == float(stats.v[0, 0])
    assert float(state.coords[0, 1]) == 1.0 and state.bases[0, 1].tolist() == [1, -1, 1, -1]
    assert float(state.coords[0, 2]) == 0.5 and torch.equal(state.bases[0, 2], bases[0, 2])
    # ŵ is unchanged by the flip itself: the same pair (-α, β) = (α, -β)
    expected = torch.tensor([[-0.99 + 1, -0.99 - 1, -0.99 + 1, -0.99 - 1]], dtype=F64)
    torch.testing.assert_close(state.reconstruct(), expected)


# ----------------------------------------------------------------------------------------------- STE step
@pytest.mark.parametrize("seed", range(3))
def test_ste_step_equals_hand_oracle(seed):
    state, gen = seeded_layer(seed + 10)
    num_groups, max_bits, n = state.bases.shape
    latent = state.reconstruct() + 0.1 * torch.randn(num_groups, n, generator=gen, dtype=F64)
    weight_stats = AmsgradStats.zeros_like(latent)
    coord_stats = AmsgradStats.zeros_like(state.coords)
    grads, lr = [], 0.02
    for step in (1, 2):
        grads.append(torch.randn(num_groups, n, generator=gen, dtype=F64))
        old, old_latent = clone(state), latent.clone()
        ste_step(state, latent, weight_stats, coord_stats, grads[-1], step, lr, CONFIG)
        _, _, _, p, h = amsgrad_tensors(grads, lr)
        torch.testing.assert_close(latent, old_latent - p / h, rtol=1e-12, atol=1e-14)
        bases, coords, unique = fit_oracle(old.coords.numpy(), old.mask.numpy(), latent.numpy(), h.numpy())
        assert unique
        assert_fit_matches(state, bases, coords, old.mask, latent, h)
        check_state(state)
        expect_coord_stats(state, weight_stats, coord_stats)


# ----------------------------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["zero_groups", "zero_grad", "all_pruned", "zero_coords"])
def test_steps_stay_finite(dtype, case):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 6, generator=gen, dtype=F64)
    if case == "zero_groups":
        w[:3] = 0
    state = greedy_init(w.to(dtype), 4)
    if case == "all_pruned":
        state.mask.zero_()
    if case == "zero_coords":
        state.coords.zero_()
    grad = torch.zeros(5, 6, dtype=dtype) if case == "zero_grad" else torch.randn(5, 6, generator=gen).to(dtype)
    before = state.reconstruct()
    weight_stats = AmsgradStats.zeros_like(grad)
    coord_stats = AmsgradStats.zeros_like(state.coords)
    latent = before.clone()
    for step in (1, 2):
        coordinate_step(state, coord_stats, grad, step, 1e-2, CONFIG)
        basis_step(state, weight_stats, coord_stats, grad, 2 * step - 1, 1e-2, CONFIG)
        ste_step(state, latent, weight_stats, coord_stats, grad, 2 * step, 1e-2, CONFIG)
        stats = (*vars(weight_stats).values(), *vars(coord_stats).values())
        for tensor in (state.coords, state.reconstruct(), latent, *stats):
            assert torch.isfinite(tensor).all()
        assert bool((state.coords >= 0).all())
    empty = ~state.mask.any(dim=1)
    assert bool((state.reconstruct()[empty] == 0).all())
    if case == "zero_grad":  # nothing to move towards: ŵ stays where it was
        torch.testing.assert_close(state.reconstruct(), before, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("block", [1, 13, 40])
def test_blocks_of_groups_give_the_same_steps(block):
    """Groups are independent: blocking changes nothing but the rounding of batched BLAS/LAPACK calls."""
    gen = torch.Generator().manual_seed(11)
    weights = torch.randn(23, 6, dtype=F64, generator=gen)
    grads = [torch.randn(23, 6, dtype=F64, generator=gen) for _ in range(3)]
    results = []
    for size in (1 << 30, block):
        state = greedy_init(weights, 4)
        weight_stats, coord_stats = AmsgradStats.zeros_like(weights), AmsgradStats.zeros_like(state.coords)
        latent = state.reconstruct()
        basis_step(state, weight_stats, coord_stats, grads[0], 1, 1e-2, CONFIG, block=size)
        ste_step(state, latent, weight_stats, coord_stats, grads[1], 2, 1e-2, CONFIG, block=size)
        basis_step(state, weight_stats, coord_stats, grads[2], 3, 1e-2, CONFIG, block=size)
        results.append([state.codes, state.coords, state.mask, latent, weight_stats.vmax, coord_stats.m])
    for whole, blocked in zip(*results):
        if whole.is_floating_point():
            torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-14)
        else:
            assert torch.equal(whole, blocked)
