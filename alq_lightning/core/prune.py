"""Importance of coordinates and groups, and deterministic selection under a bit budget.

Removing live slot ``k`` of group ``g`` moves its coordinate by ``d = -α``; the quadratic model of the
coordinate statistics prices that at ``Δℓ = -p_α α + ½ h_α α²``. Selection is global over all layers,
least important first, ties broken by (layer name, flat index), and removes the fewest entries whose bits
reach the requested saving.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .multibit import MultiBitState


def slot_importance(state: MultiBitState, p: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``[G, K]`` modelled loss increase of removing each live slot; dead slots are ``+inf``.

    ``p, h [G, K]`` are the coordinate pseudo-gradient and pseudo-Hessian.
    """
    alpha = state.coords.to(p.dtype)
    delta = -p * alpha + 0.5 * h * alpha.square()
    return torch.where(state.mask, delta, torch.inf)


def group_importance(state: MultiBitState, p: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``[G]`` modelled loss increase of removing every live slot of a group; empty groups are ``+inf``."""
    delta = torch.where(state.mask, slot_importance(state, p, h), 0).sum(dim=1)
    return torch.where(state.mask.any(dim=1), delta, torch.inf)


def select_budget(scores: torch.Tensor, bits: torch.Tensor, bits_to_remove: float) -> torch.Tensor:
    """Fewest lowest-score entries whose ``bits`` sum to at least ``bits_to_remove``.

    ``scores [M]`` (``+inf`` = not selectable), ``bits [M]`` -> bool ``[M]``. Ties keep index order.
    If the selectable entries hold fewer bits than requested, all of them are selected.
    """
    selected = torch.zeros_like(scores, dtype=torch.bool)
    if bits_to_remove <= 0 or scores.numel() == 0:
        return selected
    order = scores.argsort(stable=True)
    selectable = torch.isfinite(scores[order])
    saved = (bits[order] * selectable).cumsum(0)
    count = int(torch.searchsorted(saved, torch.tensor([bits_to_remove], dtype=saved.dtype, device=saved.device)))
    count = min(count + 1, int(selectable.sum()))
    selected[order[:count]] = True
    return selected


Selector = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], float], dict[str, torch.Tensor]]
"""``(scores, bits, bits_to_remove) -> {name: bool}`` over ``{name: tensor}`` scores and bits of one shape each."""


def select_layers(
    scores: Mapping[str, torch.Tensor], bits: Mapping[str, torch.Tensor], bits_to_remove: float
) -> dict[str, torch.Tensor]:
    """:func:`select_budget` over the entries of every layer, ordered by (layer name, flat index)."""
    names = sorted(scores)
    flat_scores = torch.cat([scores[name].reshape(-1).double() for name in names])
    flat_bits = torch.cat([bits[name].reshape(-1).double() for name in names])
    chosen = select_budget(flat_scores, flat_bits, bits_to_remove)
    sizes = [scores[name].numel() for name in names]
    return {name: part.view_as(scores[name]) for name, part in zip(names, chosen.split(sizes))}


def select_slots(
    importance: Mapping[str, torch.Tensor],
    group_sizes: Mapping[str, int],
    bits_to_remove: float,
    per_bit: bool = False,
    select: Selector = select_layers,
) -> dict[str, torch.Tensor]:
    """Slots to prune across layers: ``{name: [G, K] importance}`` -> ``{name: [G, K] bool}``.

    A slot of a group of ``n`` weights saves ``n`` bits. ``per_bit`` ranks by ``Δℓ / n`` instead of ``Δℓ``.
    The result does not depend on the mapping's order. ``select`` makes the budgeted choice (:func:`select_layers`;
    a sharded model passes one over every process's slots).
    """
    bits = {name: torch.full_like(score, float(group_sizes[name])) for name, score in importance.items()}
    scores = {name: score / bits[name] if per_bit else score for name, score in importance.items()}
    return select(scores, bits, bits_to_remove)


def select_groups(
    importance: Mapping[str, torch.Tensor],
    live_bits: Mapping[str, torch.Tensor],
    bits_to_remove: float,
    select: Selector = select_layers,
) -> dict[str, torch.Tensor]:
    """Whole groups to prune, ranked by loss increase per bit saved.

    ``importance {name: [G]}`` from :func:`group_importance`, ``live_bits {name: [G]}`` = ``I_g · n``
    -> ``{name: [G] bool}``; ``select`` as in :func:`select_slots`.
    """
    scores = {
        name: torch.where(live_bits[name] > 0, score / live_bits[name].clamp(min=1), torch.inf)
        for name, score in importance.items()
    }
    return select(scores, live_bits, bits_to_remove)
