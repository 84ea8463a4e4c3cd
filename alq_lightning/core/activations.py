"""Multi-bit activations (LQ-Net style, the activation half of the paper's multi-bit network).

An input is quantized per channel ``c`` (one channel for a whole layer) to the ``2^J`` levels ``γ_cᵀ e`` of its
coordinates ``γ_c ∈ R^J`` (``J = act_bits``) over the codes ``e ∈ {−1,+1}^J`` (``signed``), or ``e ∈ {0,1}^J`` for
non-negative inputs (``unsigned``), so that a zero input stays exactly 0. Code ``i`` has ``e_j`` on (+1 or 1)
iff bit ``j`` of ``i`` is set, as for the weights' bases.

Forward: every element goes to its nearest level (the sorted-codebook search of the basis step); backward:
straight through inside ``[lowest level, highest level]``, zero outside. ``γ`` is fitted by alternating the
nearest-level assignment with a least-squares refit (the error never increases), from a uniform start.
"""
from __future__ import annotations

import torch

from .multibit import all_patterns, fit_pattern_sums, pattern_sums
from .steps import count_below


def level_patterns(act_bits: int, signed: bool, dtype: torch.dtype,
                   device: torch.device | None = None) -> torch.Tensor:
    """``[2^J, J]``: row ``i`` holds code ``i``'s ``e``, ±1 (``signed``) or 0/1."""
    patterns = all_patterns(act_bits, dtype, device)
    return patterns if signed else (patterns + 1) / 2


def levels(coords: torch.Tensor, signed: bool) -> torch.Tensor:
    """``[C, 2^J]``: the level ``γ_cᵀ e`` of every code for ``coords [C, J]``, summed in float64 (exact for
    float32 terms), in the coordinates' dtype."""
    patterns = level_patterns(coords.shape[1], signed, torch.float64, coords.device)
    return (coords.double() @ patterns.T).to(coords.dtype)


def nearest_levels(coords: torch.Tensor, x: torch.Tensor, signed: bool) -> torch.Tensor:
    """``[C, n]`` int64: per element of ``x [C, n]`` the code of its channel's nearest level (ties: the lower
    level)."""
    values, order = levels(coords, signed).sort(dim=1)
    return order.gather(1, _ranks(values, x))


def _ranks(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[C, n]`` int64: per element of ``x`` the rank of its nearest level among a channel's ascending
    ``values [C, 2^J]`` (ties: the lower)."""
    return count_below((values[:, 1:] + values[:, :-1]) / 2, x.to(values.dtype))


def refit_levels(codes: torch.Tensor, x: torch.Tensor, act_bits: int, signed: bool) -> torch.Tensor:
    """``[C, J]``: least squares ``argmin_γ Σ_i (γᵀ e_{codes_i} - x_i)²`` per channel, for ``codes, x [C, n]``
    (a ridge keeps a channel whose elements use too few codes solvable). Signed coordinates end ``>= 0``: the
    levels of ``±γ_j`` are the same set."""
    counts, sums = _per_code(codes, x, act_bits)
    return _solve(counts, sums, act_bits, signed)


def _per_code(codes: torch.Tensor, x: torch.Tensor, act_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[C, 2^J]`` twice: per channel and code (or rank) the number of elements of ``x [C, n]`` and their sum."""
    channels, size = x.shape[0], 1 << act_bits
    keys = codes if channels == 1 else codes + size * torch.arange(channels, device=x.device)[:, None]
    counts = torch.bincount(keys.reshape(-1), minlength=channels * size).view(channels, size).to(x.dtype)
    return counts, pattern_sums(codes, x, act_bits)


def _solve(counts: torch.Tensor, sums: torch.Tensor, act_bits: int, signed: bool) -> torch.Tensor:
    """``[C, J]``: the least-squares coordinates of per-code ``counts, sums [C, 2^J]`` (:func:`refit_levels`)."""
    patterns = level_patterns(act_bits, signed, sums.dtype, sums.device)
    mask = torch.ones(sums.shape[0], act_bits, dtype=torch.bool, device=sums.device)
    coords = fit_pattern_sums(counts, sums, mask, patterns)
    return coords.abs() if signed else coords


def uniform_levels(x: torch.Tensor, act_bits: int, signed: bool) -> torch.Tensor:
    """``[C, J]``: coordinates of ``2^J`` evenly spaced levels spanning ``x [C, n]`` (``[-a, a]`` with ``a`` the
    largest ``|x|`` of the channel, signed; ``[0, a]`` with ``a`` its largest value, unsigned)."""
    top = (x.abs() if signed else x.clamp(min=0)).amax(dim=1, keepdim=True)
    powers = 2.0 ** torch.arange(act_bits, dtype=x.dtype, device=x.device)
    step = powers / (2**act_bits - 1)
    return top * (step.flip(0) if signed else step)


def quantization_error(coords: torch.Tensor, x: torch.Tensor, signed: bool) -> torch.Tensor:
    """``[C]``: ``Σ_i (x̂_i - x_i)²`` per channel with every element at its nearest level."""
    return _assign(coords, x, signed)[2]


def _assign(coords: torch.Tensor, x: torch.Tensor,
            signed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per element of ``x`` the rank ``[C, n]`` of its nearest level, the codes ``[C, 2^J]`` of the ranks, and
    the error ``[C]`` of :func:`quantization_error`."""
    values, order = levels(coords, signed).sort(dim=1)
    ranks = _ranks(values, x)
    return ranks, order, (values.gather(1, ranks) - x).square().sum(dim=1)


def fit_levels(x: torch.Tensor, act_bits: int, signed: bool, coords: torch.Tensor | None = None,
               iterations: int = 5) -> torch.Tensor:
    """``[C, J]``: coordinates fitted to ``x [C, n]`` by ``iterations`` rounds of nearest-level assignment and
    least-squares refit, from ``coords`` (default :func:`uniform_levels`). A refit that would raise a
    channel's error (possible only through the ridge) is not taken, so the error never increases.

    Elements are counted by the rank of their level and the ``[C, 2^J]`` counts and sums are then put in code
    order, so no pass over ``x`` maps ranks to codes.
    """
    coords = uniform_levels(x, act_bits, signed) if coords is None else coords.to(x.dtype)
    ranks, order, error = _assign(coords, x, signed)
    for iteration in range(iterations):
        counts, sums = _per_code(ranks, x, act_bits)
        refit = _solve(counts.scatter(1, order, counts), sums.scatter(1, order, sums), act_bits, signed)
        refit_ranks, refit_order, refit_error = _assign(refit, x, signed)
        better = refit_error <= error
        coords = torch.where(better[:, None], refit, coords)
        if iteration + 1 < iterations:
            ranks = torch.where(better[:, None], refit_ranks, ranks)
            order = torch.where(better[:, None], refit_order, order)
        error = torch.where(better, refit_error, error)
    return coords


class _Quantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        """``values [C, 2^J]`` ascending, ``ranks [C, n]`` into them."""
        ctx.save_for_backward((x >= values[:, :1]) & (x <= values[:, -1:]))
        return values.gather(1, ranks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def quantize_activations(x: torch.Tensor, coords: torch.Tensor, signed: bool) -> torch.Tensor:
    """``x [C, n]`` at its channel's nearest level of ``coords [C, J]``; the gradient passes straight through
    where ``x`` lies within the channel's level range and is 0 outside (clipped)."""
    values = levels(coords.to(x.dtype), signed).sort(dim=1).values
    return _Quantize.apply(x, values, _ranks(values, x.detach()))
