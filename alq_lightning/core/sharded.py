"""Budgeted selection over entries spread across processes, reached with a few reductions of bucket counts.

Each process holds some entries of one global list: their ``scores`` (float), ``bits`` (integers) and global
``index`` (each index held by exactly one process). :func:`select_budget_sharded` selects exactly the entries that
:func:`~alq_lightning.core.prune.select_budget` selects on the whole list ordered by global index: the fewest
lowest-score finite entries, ties by index, whose bits reach the budget (all finite ones when they hold less).

The last selected entry is found by a radix search over the 128-bit key ``(score, index)``: 8 bits per round, each
round one sum over processes of a ``[256]`` int64 histogram of bits (16 rounds, plus one for the total). Sums of
integer bits are exact, so every process takes the same decisions whatever the order of the reduction.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

AllReduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums an int64 tensor over the processes (in place or not) and returns the sum; identical on every process."""

_SIGN = -(1 << 63)
_LOW = (1 << 63) - 1
_RADIX = 8


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """``[M]`` int64 keys ordered as ``scores [M]`` (float64) are, ``-0.0`` equal to ``+0.0``, then moved to the
    unsigned order (sign bit flipped), so that bytes compare from the top one down."""
    bits = (scores.double() + 0.0).view(torch.int64)
    signed = torch.where(bits < 0, bits ^ _LOW, bits)
    return signed ^ _SIGN


def _byte(keys: torch.Tensor, shift: int) -> torch.Tensor:
    return (keys >> shift) & 0xFF


def select_budget_sharded(scores: torch.Tensor, bits: torch.Tensor, index: torch.Tensor, bits_to_remove: float,
                          all_reduce: AllReduce) -> torch.Tensor:
    """This process's part of the global :func:`~alq_lightning.core.prune.select_budget`.

    ``scores [M]`` (``+inf`` = not selectable), ``bits [M]`` integer-valued, ``index [M]`` int64 global positions
    (unique over the processes, non-negative) -> bool ``[M]``. Every process must call it with the same
    ``bits_to_remove`` (it runs 17 reductions).
    """
    if not (scores.shape == bits.shape == index.shape and scores.dim() == 1):
        raise ValueError(f"scores, bits and index must be 1-D of one length, got {tuple(scores.shape)}, "
                         f"{tuple(bits.shape)}, {tuple(index.shape)}")
    finite = torch.isfinite(scores)
    weight = torch.where(finite, bits.round().long(), 0)
    total = int(all_reduce(weight.sum().reshape(1))[0])
    if bits_to_remove <= 0:
        return torch.zeros_like(finite)
    if total < bits_to_remove:
        return finite
    below = torch.zeros_like(finite)
    candidate = finite.clone()
    base = 0
    keys = order_keys(scores)
    for values in (keys, index.long()):
        for shift in range(64 - _RADIX, -1, -_RADIX):
            digit = _byte(values, shift)
            histogram = torch.zeros(1 << _RADIX, dtype=torch.long, device=scores.device)
            histogram.index_add_(0, digit[candidate], weight[candidate])
            reached = base + all_reduce(histogram).cumsum(0)
            chosen = int((reached.double() < bits_to_remove).sum())  # reached is non-decreasing
            base = int(reached[chosen - 1]) if chosen else base
            below |= candidate & (digit < chosen)
            candidate &= digit == chosen
    return below | candidate
