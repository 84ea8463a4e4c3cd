"""Dot products of binary vectors on bit-packed integers (XNOR/AND and popcount), the arithmetic of a multi-bit
network: ``β_kᵀ b_j`` for weight bases ``β_k ∈ {−1,+1}^n`` and activation bases ``b_j`` in ``{−1,+1}^n`` or
``{0,1}^n``, so that ``y = Σ_k Σ_j α_k γ_j (β_kᵀ b_j)``.

A vector is given by its bits ``[..., n]`` (True for +1, or for 1) and packed eight to a byte, little-endian in
bit order (element ``i`` is bit ``i % 8`` of byte ``i // 8``); padding bits are 0 in both operands, so they add
nothing to any count below.
"""
from __future__ import annotations

import torch

_WEIGHTS = 1 << torch.arange(8, dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``bits [..., n]`` bool -> ``[..., ceil(n/8)]`` uint8."""
    n = bits.shape[-1]
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, -n % 8))
    chunks = padded.view(*bits.shape[:-1], -1, 8)
    return (chunks * _WEIGHTS.to(bits.device)).sum(dim=-1, dtype=torch.uint8)


def popcount(packed: torch.Tensor) -> torch.Tensor:
    """``[..., m]`` uint8 -> ``[...]`` int64: set bits in all ``m`` bytes."""
    return _POPCOUNT.to(packed.device)[packed.long()].sum(dim=-1)


def binary_dot(weight_bits: torch.Tensor, input_bits: torch.Tensor, n: int, signed_input: bool) -> torch.Tensor:
    """``[O, I]`` int64: ``β_oᵀ b_i`` for packed ±1 weight vectors ``weight_bits [O, m]`` and packed input vectors
    ``input_bits [I, m]`` of length ``n``: ±1 inputs give ``n − 2·popcount(β XOR b)``; {0,1} inputs give
    ``2·popcount(β AND b) − popcount(b)``."""
    w, x = weight_bits[:, None, :], input_bits[None, :, :]
    if signed_input:
        return n - 2 * popcount(w ^ x)
    return 2 * popcount(w & x) - popcount(input_bits)[None, :]


def group_dots(weight_bits: torch.Tensor, input_bits: torch.Tensor, valid: torch.Tensor,
               signed_input: bool) -> torch.Tensor:
    """``[B, G, K]`` int64: per group ``g`` the dot of each of its weight bases ``β_{g,k}`` with the ``B`` input
    vectors ``b_{·,g}``, counted over the ``valid`` elements only (a padded input is 0 in the float product,
    which no ±1 code can be).

    ``weight_bits [G, K, m]`` packed ±1 bases (bit set for +1); ``input_bits [B, G, m]`` packed codes (+1 or 1
    where set); ``valid [B, G, m]`` packed, set on the real elements (padding bits clear in all three).
    ±1 inputs: ``popcount(valid) − 2·popcount((β XOR b) AND valid)``; {0,1} inputs:
    ``2·popcount(β AND b AND valid) − popcount(b AND valid)``.
    """
    w, x, v = weight_bits[None], input_bits[:, :, None], valid[:, :, None]
    if signed_input:
        return popcount(valid)[:, :, None] - 2 * popcount((w ^ x) & v)
    return 2 * popcount(w & x & v) - popcount(input_bits & valid)[:, :, None]


def multibit_products(weight_bits: torch.Tensor, live_coords: torch.Tensor, input_codes: torch.Tensor,
                      valid: torch.Tensor, act_coords: torch.Tensor, signed_input: bool) -> torch.Tensor:
    """``[B, G]``: per group ``Σ_k Σ_j α_k γ_j (β_kᵀ b_j)`` over its ``n`` weights, the group's share of an output.

    ``weight_bits [G, K, n]`` bool (``β = +1``), ``live_coords [G, K]`` (dead slots 0), ``input_codes [B, G, n]``
    int64: the activation code of the input each weight multiplies (bit ``j`` set: ``b_j`` is +1, or 1),
    ``valid [B, G, n]`` bool (False where the input is padding), ``act_coords [J]``. The dot products are
    integers from :func:`group_dots`; only the final weighting by ``α γ`` is floating point (float64).
    """
    packed_weights, packed_valid = pack_bits(weight_bits), pack_bits(valid)
    total = torch.zeros(input_codes.shape[:2], dtype=torch.float64, device=input_codes.device)
    for j, gamma in enumerate(act_coords.double().tolist()):
        dots = group_dots(packed_weights, pack_bits((input_codes >> j) & 1 == 1), packed_valid, signed_input)
        total += gamma * (dots.double() * live_coords.double()).sum(dim=2)
    return total
