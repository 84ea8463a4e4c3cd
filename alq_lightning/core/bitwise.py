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
