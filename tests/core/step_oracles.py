"""Brute-force and hand-written oracles of the loss-aware steps, shared by the step tests."""
import itertools
import math

import numpy as np
import pytest
import torch

from alq_lightning.core import (
    MultiBitState,
    QuadraticConfig,
)

B1, B2, EPS = 0.9, 0.999, 1e-8
CONFIG = QuadraticConfig()
F64 = torch.float64



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
