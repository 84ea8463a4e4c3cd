"""AMSGrad statistics (§3) and the loss-aware steps (§4) against brute-force and hand-written oracles."""
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
    QuadraticConfig,
    all_patterns,
    basis_step,
    coordinate_step,
    fit_bases,
    greedy_init,
    nearest_patterns,
    project_grad,
    quadratic_model,
    rederive_coord_stats,
    refit_coords,
    ste_step,
    update_stats,
)

B1, B2, EPS = 0.9, 0.999, 1e-8
CONFIG = QuadraticConfig()
F64 = torch.float64


# ----------------------------------------------------------------------------------------------- oracles
def pack(bases):
    """``[G, K, n]`` ±1 -> ``[G, n]`` uint8 codes: bit k set iff β_k = +1."""
    bases = torch.as_tensor(bases)
    codes = torch.zeros(bases.shape[0], bases.shape[2], dtype=torch.long)
    for k in range(bases.shape[1]):
        codes |= (bases[:, k] > 0).long() << k
    return codes.to(torch.uint8)


def decode(index, max_bits):
    """Pattern index -> tuple of ±1 (bit k set iff +1)."""
    return tuple(1 if (int(index) >> k) & 1 else -1 for k in range(max_bits))


def amsgrad_oracle(grads, lr):
    """Hand AMSGrad recurrence on Python floats: ``grads`` is a list (steps) of equal-length lists."""
    size = len(grads[0])
    m, v, vmax = [0.0] * size, [0.0] * size, [0.0] * size
    for g in grads:
        m = [B1 * a + (1 - B1) * b for a, b in zip(m, g)]
        v = [B2 * a + (1 - B2) * b * b for a, b in zip(v, g)]
        vmax = [max(a, b) for a, b in zip(vmax, v)]
    t = len(grads)
    p = [lr * a / (1 - B1**t) for a in m]
    h = [(math.sqrt(a) + EPS) / math.sqrt(1 - B2**t) for a in vmax]
    return m, v, vmax, p, h


def amsgrad_tensors(grads, lr):
    """``amsgrad_oracle`` elementwise over a list of equally shaped tensors."""
    shape = grads[0].shape
    flat = [g.reshape(-1).tolist() for g in grads]
    return [torch.tensor(x, dtype=F64).reshape(shape) for x in amsgrad_oracle(flat, lr)]


def brute_nearest(coords, mask, value, tol=1e-12):
    """Minimisers over {±1}^K of |Σ_k m_k α_k b_k - value| (up to ``tol``, rounding of the sums):
    (distance, [(pattern value, pattern), ...])."""
    k = len(coords)
    scored = []
    for pattern in itertools.product((-1, 1), repeat=k):
        total = sum(float(c) * b for c, b, m in zip(coords, pattern, mask) if m)
        scored.append((abs(total - value), total, pattern))
    best = min(s[0] for s in scored)
    return best, [(s[1], s[2]) for s in scored if s[0] <= best + tol]


def wls_oracle(bases, mask, target, weight):
    """Per group: argmin_α Σ_j w_j (Σ_live α_k β_jk - t_j)², by lstsq on the sqrt(w)-scaled system. [G, K]."""
    bases, mask, target, weight = (np.asarray(x, dtype=np.float64) for x in (bases, mask, target, weight))
    coords = np.zeros(mask.shape)
    for g in range(mask.shape[0]):
        live = np.flatnonzero(mask[g])
        if live.size:
            scale = np.sqrt(weight[g])
            design = bases[g][live].T * scale[:, None]
            coords[g, live] = np.linalg.lstsq(design, target[g] * scale, rcond=None)[0]
    return coords


def reconstruct(bases, coords, mask):
    return np.einsum("gkn,gk->gn", np.asarray(bases, dtype=np.float64), np.asarray(coords) * np.asarray(mask))


def weighted_error(bases, coords, mask, target, weight):
    return (np.asarray(weight) * (reconstruct(bases, coords, mask) - np.asarray(target)) ** 2).sum(axis=1)


def fit_oracle(coords, mask, target, weight):
    """§4 basis step 1-3 by brute force: nearest patterns (dead bits +1), WLS refit, flips.

    Returns (bases [G, K, n] before flips, coords before flips, unique) where ``unique`` says whether every
    weight had a single nearest live pattern.
    """
    g_count, k_count = mask.shape
    n = target.shape[1]
    bases = np.ones((g_count, k_count, n))
    unique = True
    for g in range(g_count):
        for j in range(n):
            _, best = brute_nearest(coords[g].tolist(), mask[g].tolist(), float(target[g, j]))
            live_patterns = {tuple(b for b, m in zip(p, mask[g].tolist()) if m) for _, p in best}
            unique &= len(live_patterns) == 1
            pattern = best[0][1]
            bases[g, :, j] = [b if m else 1 for b, m in zip(pattern, mask[g].tolist())]
    return bases, wls_oracle(bases, mask, target, weight), unique


def assert_fit_matches(state, bases, coords, mask, target, weight):
    """``state`` equals the oracle's (bases, coords) up to the (α, β) sign flips that make α >= 0."""
    mask_np = mask.numpy()
    got = reconstruct(state.bases, state.coords, state.mask)
    scale = np.abs(target.numpy()).max() + 1
    np.testing.assert_allclose(got, reconstruct(bases, coords, mask_np), rtol=0, atol=1e-9 * scale)
    for g, k in zip(*np.nonzero(mask_np)):
        b = state.bases[g, k].numpy().astype(np.float64)
        assert np.array_equal(b, bases[g, k]) or np.array_equal(b, -bases[g, k])
        design = bases[g][mask_np[g]].T
        well_posed = np.linalg.matrix_rank(design) == design.shape[1] and np.linalg.cond(design) < 1e6
        if well_posed and abs(coords[g, k]) > 1e-9 * scale:
            flipped = coords[g, k] < 0
            assert np.array_equal(b, -bases[g, k] if flipped else bases[g, k])
            assert float(state.coords[g, k]) == pytest.approx(abs(coords[g, k]), rel=1e-8, abs=1e-10 * scale)


def random_state(gen, num_groups, max_bits, group_size, dead=0.3, dtype=F64):
    bases = (torch.randint(0, 2, (num_groups, max_bits, group_size), generator=gen) * 2 - 1).to(torch.int8)
    coords = torch.rand(num_groups, max_bits, generator=gen, dtype=dtype) * 2
    mask = torch.rand(num_groups, max_bits, generator=gen) >= dead
    bases[~mask] = 1
    coords[~mask] = 0
    return MultiBitState(pack(bases), coords, mask)


def clone(state):
    return MultiBitState(state.codes.clone(), state.coords.clone(), state.mask.clone())


def check_state(state):
    assert bool(((state.bases == 1) | (state.bases == -1)).all()) and state.bases.dtype == torch.int8
    assert torch.isfinite(state.coords).all() and bool((state.coords >= 0).all())
    assert bool((state.bases[~state.mask] == 1).all()) and bool((state.coords[~state.mask] == 0).all())


# ----------------------------------------------------------------------------------------------- statistics
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
@given(
    seed=st.integers(0, 2**31 - 1),
    num_groups=st.integers(1, 3),
    group_size=st.integers(1, 8),
    max_bits=st.integers(1, 6),
)
@settings(max_examples=40, deadline=None)
def test_fit_bases_equals_brute_force_and_never_fits_worse(seed, num_groups, group_size, max_bits):
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
    # the step never fits worse than the state it started from (new patterns are per-weight nearest, refit is optimal)
    new_err = weighted_error(state.bases, state.coords, state.mask, target, weight)
    old_err = weighted_error(old.bases, old.coords, old.mask, target, weight)
    assert np.all(new_err <= old_err * (1 + 1e-9) + 1e-12)
    assert torch.equal(state.mask, old.mask)


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
    assert np.all(weighted_error(state.bases, state.coords, state.mask, target, weight) <= kept_err * (1 + 1e-9) + 1e-12)


def test_fit_bases_reproduces_representable_target():
    state = greedy_init(torch.randn(5, 7, dtype=F64, generator=torch.Generator().manual_seed(1)), 3)
    target = state.reconstruct()
    before = clone(state)
    fit_bases(state, target, torch.ones_like(target))
    torch.testing.assert_close(state.reconstruct(), target, rtol=0, atol=1e-12)
    torch.testing.assert_close(state.coords, before.coords, rtol=1e-10, atol=1e-12)


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


def expect_coord_stats(state, weight_stats, coord_stats):
    """§4 step 4: m_α = βᵀ m on live slots, v_α = Σ_group v, v̄_α = Σ_group v̄."""
    num_groups, max_bits, n = state.bases.shape
    for g in range(num_groups):
        for k in range(max_bits):
            if state.mask[g, k]:
                want = sum(int(state.bases[g, k, j]) * float(weight_stats.m[g, j]) for j in range(n))
                assert float(coord_stats.m[g, k]) == pytest.approx(want, rel=1e-12, abs=1e-15)
            else:
                assert float(coord_stats.m[g, k]) == 0.0
            assert float(coord_stats.v[g, k]) == pytest.approx(float(weight_stats.v[g].sum()), rel=1e-12)
            assert float(coord_stats.vmax[g, k]) == pytest.approx(float(weight_stats.vmax[g].sum()), rel=1e-12)


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
def coordinate_oracle(state, stats, grads, lr, first_step):
    """Expected (coords, bases, m, v, v̄) after ``grads`` (bases fixed, flips tracked by hand)."""
    num_groups, max_bits, n = state.bases.shape
    bases = state.bases.numpy().astype(np.float64).copy()
    coords = state.coords.numpy().copy()
    mask = state.mask.numpy()
    m, v, vmax = (x.numpy().copy() for x in (stats.m, stats.v, stats.vmax))
    for t, grad in enumerate(grads, start=first_step):
        for g in range(num_groups):
            for k in range(max_bits):
                g_alpha = sum(bases[g, k, j] * float(grad[g, j]) for j in range(n)) if mask[g, k] else 0.0
                m[g, k] = B1 * m[g, k] + (1 - B1) * g_alpha
                v[g, k] = B2 * v[g, k] + (1 - B2) * g_alpha**2
                vmax[g, k] = max(vmax[g, k], v[g, k])
                if mask[g, k]:
                    p = lr * m[g, k] / (1 - B1**t)
                    h = (math.sqrt(vmax[g, k]) + EPS) / math.sqrt(1 - B2**t)
                    coords[g, k] -= p / h
                    if coords[g, k] < 0:
                        coords[g, k], bases[g, k], m[g, k] = -coords[g, k], -bases[g, k], -m[g, k]
    return coords, bases, m, v, vmax


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
    stats = AmsgradStats(torch.randn(num_groups, max_bits, generator=gen, dtype=F64), v, v + torch.rand(v.shape, generator=gen, dtype=F64))
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
    torch.testing.assert_close(state.reconstruct(), torch.tensor([[-0.99 + 1, -0.99 - 1, -0.99 + 1, -0.99 - 1]], dtype=F64))


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
        for tensor in (state.coords, state.reconstruct(), latent, *vars(weight_stats).values(), *vars(coord_stats).values()):
            assert torch.isfinite(tensor).all()
        assert bool((state.coords >= 0).all())
    empty = ~state.mask.any(dim=1)
    assert bool((state.reconstruct()[empty] == 0).all())
    if case == "zero_grad":  # nothing to move towards: ŵ stays where it was
        torch.testing.assert_close(state.reconstruct(), before, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
