"""Bit-level encoding of multi-bit layers and raw bytes of tensors (plain torch, any device).

Bit streams are little-endian within a byte: bit ``i`` of a stream is bit ``i % 8`` (least significant
first) of byte ``i // 8``; the last byte is padded with zero bits. Multi-byte values are little-endian.

One layer of ``G`` groups of ``n`` weights, ``K = max_bits`` slots and ``L`` live slots is encoded as

- ``mask``   ``ceil(G·K / 8)`` bytes: the ``[G, K]`` mask, row-major;
- ``bases``  ``ceil(L·n / 8)`` bytes: for each live slot in ``(g, k)`` order, its ``n`` bits
  (bit set iff ``β = +1``);
- ``coords`` ``L · 4`` (float32) or ``L · 2`` (float16) bytes: the live coordinates in the same order.

Decoding restores the canonical dead slots: ``α = 0`` and ``β = +1`` (its code bit set).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .core import MultiBitState

COORD_DTYPES = {32: torch.float32, 16: torch.float16}


def check_byteorder() -> None:
    """Raw tensor bytes are written and read as little-endian, the native order of supported hosts."""
    if sys.byteorder != "little":
        raise RuntimeError(f"packed files need a little-endian host, this one is {sys.byteorder}-endian")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; ValueError for anything that is not a torch dtype."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype")
    return dtype


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Bool tensor of any shape (read row-major) -> ``[ceil(numel / 8)]`` uint8."""
    flat = flags.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 8))
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """``[B]`` uint8 -> the first ``count`` bits as ``[count]`` bool (``count <= 8·B``)."""
    if count > 8 * packed.numel():
        raise ValueError(f"{packed.numel()} bytes hold fewer than {count} bits")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).reshape(-1)[:count].bool()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of ``tensor`` (row-major)."""
    check_byteorder()
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """``[B]`` uint8 (a slice of a file) -> a new tensor of ``dtype`` and ``shape``."""
    check_byteorder()
    return raw.clone().view(dtype).reshape(shape)


def section_lengths(num_groups: int, group_size: int, max_bits: int, live_slots: int,
                    coord_dtype: torch.dtype) -> tuple[int, int, int]:
    """Byte lengths of the ``(mask, bases, coords)`` that :func:`encode_layer` writes for such a layer."""
    return -(-num_groups * max_bits // 8), -(-live_slots * group_size // 8), live_slots * coord_dtype.itemsize


def encode_layer(state: MultiBitState, coord_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mask, bases, coords)`` byte tensors (uint8, on the state's device) of one layer.

    Raises ValueError when a live coordinate does not fit ``coord_dtype`` (float16 tops out at 65504).
    """
    live = state.mask.nonzero()
    groups, slots = live[:, 0], live[:, 1].to(torch.uint8)
    bits = ((state.codes[groups] >> slots[:, None]) & 1).bool()
    coords = state.coords[state.mask].to(coord_dtype)
    if not coords.isfinite().all():
        raise ValueError(f"a live coordinate does not fit {dtype_name(coord_dtype)}; export with coord_bits=32")
    return pack_bits(state.mask), pack_bits(bits), coords.reshape(-1).view(torch.uint8)


def decode_layer(mask: torch.Tensor, bases: torch.Tensor, coords: torch.Tensor, num_groups: int, group_size: int,
                 max_bits: int, coord_dtype: torch.dtype, dtype: torch.dtype) -> MultiBitState:
    """Inverse of :func:`encode_layer`: bytes -> ``codes [G, n]``, ``coords [G, K]`` (``dtype``), ``mask [G, K]``.

    ``coords`` must start at an offset aligned to ``coord_dtype`` (a fresh tensor, not a slice of a file).
    """
    live_mask = unpack_bits(mask, num_groups * max_bits).view(num_groups, max_bits)
    live = live_mask.nonzero()
    groups, slots = live[:, 0], live[:, 1].to(torch.uint8)
    bits = unpack_bits(bases, live.shape[0] * group_size).view(-1, group_size)
    cleared = (~bits).to(torch.uint8) << slots[:, None]
    codes = torch.zeros(num_groups, group_size, dtype=torch.uint8, device=mask.device).index_add_(0, groups, cleared)
    codes = (2**max_bits - 1) - codes
    values = torch.zeros(num_groups, max_bits, dtype=dtype, device=mask.device)
    values[live_mask] = coords.view(coord_dtype).to(dtype)
    return MultiBitState(codes, values, live_mask)
