"""Stored bytes and bits of a quantized model, and the check that a peer's weights really are quantized.

Pure PyTorch (no torchao, no brevitas): ``bench/peers.py`` uses these helpers for every method, and the tests run
them without the ``peers`` extra.

A peer's quantized weight matrix is stored as codes (``code_bits`` per weight, packed) plus, per group (a row or a
block of weights), ``scales_per_group`` float32 scales: PARQ's ``LSBQuantizer`` at ``b`` bits keeps ``b`` scales
``v_1..v_b`` per group (the weight is ``Σ v_i s_i``, ``s_i = ±1``), its ``UnifQuantizer`` one scale (the levels
are ``±(k + 1/2)·s``, no stored zero point), Brevitas binary and ternary weights one learned scale per output
channel, with ternary codes packed at 2 bits. Everything else in the ``state_dict`` (biases, norms, weights left
in float) is the float remainder, counted at its own dtype as ALQ's ``bit_summary`` counts it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

SCALE_BYTES = 4  # float32 scales, the models' dtype


@dataclass(frozen=True)
class CodedTensor:
    """One quantized weight matrix of a peer: ``numel`` codes of ``code_bits`` and ``groups`` × ``scales_per_group``
    float32 scales."""

    name: str
    numel: int
    groups: int
    code_bits: int
    scales_per_group: int

    def __post_init__(self) -> None:
        for field in ("numel", "groups", "code_bits", "scales_per_group"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CodedTensor {self.name!r}: {field}={value!r} must be a positive integer")
        if self.numel % self.groups:
            raise ValueError(f"CodedTensor {self.name!r}: numel={self.numel} is not a multiple of "
                             f"groups={self.groups}")

    @property
    def code_bytes(self) -> int:
        return -(-self.numel * self.code_bits // 8)

    @property
    def scale_bytes(self) -> int:
        return self.groups * self.scales_per_group * SCALE_BYTES

    @property
    def bytes(self) -> int:
        return self.code_bytes + self.scale_bytes


def groups_of(shape: Iterable[int], block: int | None) -> int:
    """Number of scale groups of a weight of ``shape``: its rows (dim 0) when ``block`` is None, else blocks of
    ``block`` consecutive weights (which must tile every row)."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if block is None:
        return shape[0]
    if block < 1 or (numel // shape[0]) % block:
        raise ValueError(f"block={block} must be a positive divisor of the row length {numel // shape[0]} "
                         f"of a weight of shape {list(shape)}")
    return numel // block


def remainder_bytes(state: Mapping[str, torch.Tensor], quantized: Iterable[str]) -> int:
    """Bytes of every ``state`` tensor not named in ``quantized``, at its own dtype; raises on a name of
    ``quantized`` that ``state`` lacks."""
    quantized = set(quantized)
    missing = sorted(quantized - set(state))
    if missing:
        raise KeyError(f"quantized names {missing} are not in the state_dict")
    return sum(t.numel() * t.element_size() for name, t in state.items() if name not in quantized)


def storage(quantized_bytes: int, numel: int, code_bits: float, remainder: int) -> dict:
    """The record of one model: bytes of its quantized part and of the whole model, and bits per quantized
    weight counted both ways: ``code_bits`` (binary bases or codes only, as the ALQ paper counts) and
    ``stored_bits`` (every stored byte of the quantized matrices: codes, scales, coordinates, masks)."""
    if numel < 1:
        raise ValueError(f"numel={numel} must be positive")
    return {"quantized_bytes": quantized_bytes, "remainder_bytes": remainder,
            "model_bytes": quantized_bytes + remainder, "quantized_weights": numel,
            "code_bits": code_bits, "stored_bits": 8 * quantized_bytes / numel}


def peer_storage(tensors: Iterable[CodedTensor], remainder: int) -> dict:
    """:func:`storage` of a peer's coded matrices."""
    tensors = list(tensors)
    numel = sum(t.numel for t in tensors)
    code_bits = sum(t.numel * t.code_bits for t in tensors) / max(numel, 1)
    return storage(sum(t.bytes for t in tensors), numel, code_bits, remainder)


def alq_storage(summary) -> dict:
    """:func:`storage` of an ALQ model from its ``bit_summary``: bases, live coordinates and masks, float remainder."""
    return storage(summary.storage_bytes, summary.numel, summary.avg_bits, summary.remainder_bytes)


def max_levels(weight: torch.Tensor, block: int | None, rtol: float = 1e-5) -> int:
    """Most distinct values in one group of ``weight``: a row (dim 0, the rest flattened) when ``block`` is None,
    else a block of ``block`` consecutive weights. Values closer than ``rtol`` × the group's largest magnitude
    count as one: PARQ forms its levels as ``p - (p - Σ v_i s_i)``, which differs from ``Σ v_i s_i`` in the last
    bits (a float32 ulp is 1.2e-7 relative)."""
    groups = weight.detach().reshape(weight.shape[0], -1) if block is None else weight.detach().reshape(-1, block)
    ordered = groups.sort(dim=1).values
    tolerance = rtol * ordered.abs().amax(dim=1, keepdim=True)
    return int(1 + ((ordered[:, 1:] - ordered[:, :-1]) > tolerance).sum(dim=1).max())


def best_run(runs: list[dict], key: str) -> dict:
    """The run of lowest ``key`` (a validation loss or error), the first one on a tie."""
    if not runs:
        raise ValueError("best_run needs at least one run")
    return min(runs, key=lambda r: r[key])
