"""Bit and storage accounting of multi-bit layers.

A layer of ``G`` groups of ``n`` weights with ``K = max_bits`` slots stores, per live slot, one bit per
weight (its basis) and one coordinate; per slot, one mask bit. Binary bits count bases only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

COORD_BITS = (16, 32)


def check_coord_bits(coord_bits: int) -> int:
    if coord_bits not in COORD_BITS:
        raise ValueError(f"coord_bits={coord_bits!r} must be one of {COORD_BITS}")
    return coord_bits


@dataclass(frozen=True)
class LayerBits:
    """Bit counts of one layer."""

    numel: int
    num_groups: int
    group_size: int
    max_bits: int
    live_slots: int

    @classmethod
    def of(cls, mask: torch.Tensor, group_size: int) -> LayerBits:
        """From a ``[G, K]`` mask."""
        num_groups, max_bits = mask.shape
        return cls(num_groups * group_size, num_groups, group_size, max_bits, int(mask.sum()))

    @property
    def binary_bits(self) -> int:
        """``Σ_g I_g · n``: the bases of live slots."""
        return self.live_slots * self.group_size

    @property
    def avg_bits(self) -> float:
        return self.binary_bits / self.numel

    def storage_bits(self, coord_bits: int = 32) -> int:
        """Bases + live coordinates at ``coord_bits`` + one mask bit per slot."""
        return self.binary_bits + self.live_slots * check_coord_bits(coord_bits) + self.num_groups * self.max_bits

    def storage_bytes(self, coord_bits: int = 32) -> int:
        """Storage in bytes, each of the three parts padded to whole bytes."""
        return (
            -(-self.binary_bits // 8)
            + self.live_slots * check_coord_bits(coord_bits) // 8
            + -(-(self.num_groups * self.max_bits) // 8)
        )


def average_bits(layers: list[LayerBits]) -> float:
    """Network average bitwidth: ``Σ binary bits / Σ quantized weights``."""
    total = sum(layer.numel for layer in layers)
    if total == 0:
        raise ValueError("average_bits needs at least one quantized layer")
    return sum(layer.binary_bits for layer in layers) / total
