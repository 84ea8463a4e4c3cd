"""The loss-aware steps of ALQ: coordinate step, basis step, STE step.

All tensors are in group layout: ``grad``, ``target`` and weight-domain statistics are ``[G, n]``,
coordinate-domain statistics are ``[G, K]``. Every function updates ``state`` (and statistics) in place.
"""
from __future__ import annotations

import torch

from .multibit import (
    BLOCK,
    MultiBitState,
    all_patterns,
    codebook,
    flip_negative,
    pattern_sums,
    refit_coords,
    row_blocks,
    slot_bits,
)
from .stats import AmsgradStats, QuadraticConfig, quadratic_model, update_stats


def project_grad(state: MultiBitState, grad: torch.Tensor) -> torch.Tensor:
    """``[G, n]`` gradient w.r.t. ŵ -> ``[G, K]`` gradient w.r.t. the coordinates (``βᵀ g``; dead slots 0)."""
    patterns = all_patterns(state.max_bits, grad.dtype, grad.device)
    return (pattern_sums(state.codes, grad, state.max_bits) @ patterns) * state.mask


def coordinate_step(
    state: MultiBitState,
    coord_stats: AmsgradStats,
    grad: torch.Tensor,
    step: int,
    lr: float,
    config: QuadraticConfig,
) -> None:
    """One AMSGrad step on the live coordinates (bases fixed), then flip negative ``(α, β, m_α)``.

    ``grad [G, n]`` is the gradient w.r.t. ŵ; ``step`` counts updates of ``coord_stats`` including this one.
    """
    update_stats(coord_stats, project_grad(state, grad), config)
    p, h = quadratic_model(coord_stats, step, lr, config)
    state.coords.sub_(torch.where(state.mask, p / h, 0))
    flip_negative(state, coord_stats.m)


FEW_BOUNDS = 7


def count_below(bounds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, how many of ``bounds [G, m]`` (ascending) are strictly below each ``target [G, n]`` -> int64.

    The result equals ``torch.searchsorted(bounds, target)``; the search runs branch-free, one gather per
    halving over all weights at once, which on CPU is several times faster than a branching binary search
    on unsorted targets. Up to :data:`FEW_BOUNDS` bounds (the levels of 1–3 bit activations) it compares every
    target with every bound instead, in bytes, which skips the gathers. Memory ``O(G·m + G·n)``.
    """
    if bounds.shape[1] <= FEW_BOUNDS:
        count = torch.zeros(target.shape, dtype=torch.uint8, device=target.device)
        for column in bounds.unbind(dim=1):
            count.add_(column[:, None] < target)
        return count.long()
    steps = max(bounds.shape[1], 1).bit_length()
    padded = torch.cat([bounds, bounds.new_full((bounds.shape[0], 2**steps - bounds.shape[1]), torch.inf)], dim=1)
    top = 1 << (steps - 1)
    position = torch.empty(target.shape, dtype=torch.long, device=target.device)
    torch.lt(padded[:, top - 1, None], target, out=position).mul_(top)
    probe, below = padded.new_empty(target.shape), torch.empty_like(position)
    for bit in reversed(range(steps - 1)):
        torch.gather(padded[:, (1 << bit) - 1 :], 1, position, out=probe)
        position.add_(torch.lt(probe, target, out=below), alpha=1 << bit)
    return position


def nearest_patterns(live_coords: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For each weight, the pattern index whose value ``Σ_k α_k b_k`` is nearest to ``target``.

    ``live_coords [G, K]`` (dead slots 0), ``target [G, n]`` -> ``[G, n]`` int64 in ``[0, 2^K)``.
    Each group's ``2^K`` values are sorted once and every weight is located by a batched binary search
    among the midpoints of consecutive values (:func:`count_below`), so memory is ``O(G·2^K + G·n)``.
    On a tie the smaller value wins.
    """
    values, order = codebook(live_coords).sort(dim=1)
    midpoints = (values[:, 1:] + values[:, :-1]) / 2
    return order.gather(1, count_below(midpoints, target.to(values.dtype)))


def fit_bases(state: MultiBitState, target: torch.Tensor, weight: torch.Tensor) -> None:
    """Bases nearest to ``target [G, n]`` for the current coordinates, then a ``weight``-ed coordinate refit.

    Dead slots keep ``β = +1`` and ``α = 0``; coordinates end non-negative.
    """
    index = nearest_patterns(state.live_coords().to(target.dtype), target)
    index |= slot_bits(~state.mask)[:, None]
    state.codes.copy_(index)
    state.coords.copy_(refit_coords(index, state.mask, target, weight))
    flip_negative(state)


def rederive_coord_stats(state: MultiBitState, weight_stats: AmsgradStats, coord_stats: AmsgradStats) -> None:
    """Coordinate statistics from weight statistics: ``m_α = βᵀ m``, ``v_α = Σ_g v``, ``v̄_α = Σ_g v̄``."""
    coord_stats.m.copy_(project_grad(state, weight_stats.m))
    coord_stats.v.copy_(weight_stats.v.sum(dim=1, keepdim=True).expand_as(coord_stats.v))
    coord_stats.vmax.copy_(weight_stats.vmax.sum(dim=1, keepdim=True).expand_as(coord_stats.vmax))


def _weight_domain_step(
    state: MultiBitState,
    latent: torch.Tensor | None,
    weight_stats: AmsgradStats,
    coord_stats: AmsgradStats,
    grad: torch.Tensor,
    step: int,
    lr: float,
    config: QuadraticConfig,
    block: int,
) -> None:
    """Fold ``grad`` into the weight statistics, fit bases to ``ŵ - p/h`` (or to ``latent ← latent - p/h``),
    refit coordinates weighted by ``h``, re-derive the coordinate statistics; in cache-sized blocks of groups."""
    for rows in row_blocks(state.num_groups, state.group_size, block):
        part, stats = state.rows(rows), weight_stats.rows(rows)
        update_stats(stats, grad[rows], config)
        p, h = quadratic_model(stats, step, lr, config)
        if latent is None:
            target = part.reconstruct() - p / h
        else:
            target = latent[rows].sub_(p / h)
        fit_bases(part, target, h)
        rederive_coord_stats(part, stats, coord_stats.rows(rows))


def basis_step(
    state: MultiBitState,
    weight_stats: AmsgradStats,
    coord_stats: AmsgradStats,
    grad: torch.Tensor,
    step: int,
    lr: float,
    config: QuadraticConfig,
    block: int = BLOCK,
) -> None:
    """Basis step: target ``w* = ŵ - p/h``, nearest bases, ``h``-weighted refit, re-derived coordinate stats.

    ``grad [G, n]`` is the gradient w.r.t. ŵ; ``step`` counts updates of ``weight_stats`` including this one.
    Groups are independent, so they are processed in cache-sized blocks of about ``block`` weights.
    """
    _weight_domain_step(state, None, weight_stats, coord_stats, grad, step, lr, config, block)


def ste_step(
    state: MultiBitState,
    latent: torch.Tensor,
    weight_stats: AmsgradStats,
    coord_stats: AmsgradStats,
    grad: torch.Tensor,
    step: int,
    lr: float,
    config: QuadraticConfig,
    block: int = BLOCK,
) -> None:
    """Straight-through step: ``latent [G, n] ← latent - p/h`` from the gradient at ŵ, then fit bases to it.

    Processed in blocks of groups like :func:`basis_step`.
    """
    _weight_domain_step(state, latent, weight_stats, coord_stats, grad, step, lr, config, block)
