"""The packed file format (versions 1 and 2): its layout, the bit-level encoding of a layer and the checks of a
header.

A file, all integers little-endian::

    preamble   8 bytes  magic b"ALQPACK\\0"
               uint16   format version
               uint32   header length H
               uint64   file size in bytes (everything, checksum included)
    header     H bytes  UTF-8 JSON, see below
    payload             per quantized layer, in the model's registration order:
                            mask    ceil(G·K / 8) bytes   [G, K] live mask, 1 bit per slot
                            bases   ceil(L·n / 8) bytes   n sign bits of each live slot, (g, k) order
                            coords  L·4 or L·2 bytes      live coordinates, float32 or float16, same order
                        then the float remainder: every ``state_dict()`` tensor that is not a quantized
                        weight (biases, normalisation parameters and buffers, float layers), raw bytes
    checksum  32 bytes  SHA-256 of everything before it

The header holds ``coord_bits``, ``coord_dtype``, ``quantized_bytes``, ``float_bytes``, the list ``layers``
(``name``, ``structure``, ``shape``, ``weight_dtype``, ``num_groups``, ``group_size``, ``max_bits``,
``live_slots`` and ``{"offset", "length"}`` of its ``mask``, ``bases`` and ``coords``) and the list ``float``
(``name``, ``dtype``, ``shape``, ``offset``, ``length``). Offsets count from the start of the payload. The
layer sections are exactly the accounted storage: their sizes sum to
``bit_summary(model, coord_bits).storage_bytes``.

Version 2 adds the quantizer of a layer's input (ALGORITHM.md §7) to the entry of each layer whose input is
quantized: ``"activations": {"act_bits": J, "signed": bool, "coords": [C·J numbers]}``, the coordinates
``γ [C, J]`` row-major (``C = 1`` for the whole layer, else one row per input channel), float32 values written
as JSON numbers (a float32 widened to a double prints as a decimal that reads back to the same float32), levels
``γ_cᵀ e`` over ``e ∈ {−1,+1}^J`` (``signed``) or ``{0,1}^J``. They live in the header, not the payload: the
payload (and ``quantized_bytes``) of a version-2 file is laid out as in version 1. A file without activation
quantizers is written as version 1, so readers of version 1 keep reading every file that they can serve; a
version-1 header with ``activations`` is refused (a reader of version 1 would silently compute with float
inputs).

Bit streams are little-endian within a byte: bit ``i`` of a stream is bit ``i % 8`` (least significant
first) of byte ``i // 8``; the last byte is padded with zero bits. One layer of ``G`` groups of ``n``
weights, ``K = max_bits`` slots and ``L`` live slots is encoded as

- ``mask``   ``ceil(G·K / 8)`` bytes: the ``[G, K]`` mask, row-major;
- ``bases``  ``ceil(L·n / 8)`` bytes: for each live slot in ``(g, k)`` order, its ``n`` bits
  (bit set iff ``β = +1``);
- ``coords`` ``L · 4`` (float32) or ``L · 2`` (float16) bytes: the live coordinates in the same order.

Decoding restores the canonical dead slots: ``α = 0`` and ``β = +1`` (its code bit set).

Reading and writing files is :mod:`alq_lightning.packed.io`; this module knows bytes, not files.
"""
from __future__ import annotations

import hashlib
import math
import struct
import sys
from typing import Any

import torch

from ..activations import MAX_ACT_BITS
from ..core import MultiBitState, auto_layout, check_max_bits
from ..core.bitwise import pack_bits as pack_rows

MAGIC = b"ALQPACK\0"
FORMAT_VERSION = 2
ACTIVATIONS_VERSION = 2  # the first version whose layers may carry "activations"
PREAMBLE = struct.Struct("<8sHIQ")
_FLOAT32 = struct.Struct("<f")
CHECKSUM_BYTES = hashlib.sha256().digest_size
COORD_DTYPES = {32: torch.float32, 16: torch.float16}
LAYER_SECTIONS = ("mask", "bases", "coords")
_SECTION_FIELDS = {"offset": int, "length": int}
_HEADER_FIELDS = {"coord_bits": int, "coord_dtype": str, "quantized_bytes": int, "float_bytes": int, "layers": list,
                  "float": list}
_LAYER_FIELDS = {"name": str, "structure": str, "shape": list, "weight_dtype": str, "num_groups": int,
                 "group_size": int, "max_bits": int, "live_slots": int, **dict.fromkeys(LAYER_SECTIONS, dict)}
_ACTIVATION_FIELDS = {"act_bits": int, "signed": bool, "coords": list}
_FLOAT_FIELDS = {"name": str, "dtype": str, "shape": list, **_SECTION_FIELDS}
_LAYER_SIZES = "its num_groups, group_size, max_bits, live_slots and the coord_dtype"
_JSON_TYPES = {str: "string", list: "list", dict: "JSON object", bool: "boolean"}


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


def takes_dtype(model_dtype: torch.dtype, file_dtype: torch.dtype) -> bool:
    """Whether a model tensor of ``model_dtype`` can take a stored tensor of ``file_dtype``: floating point from
    floating point (any width; the values are checked where they are rounded), anything else from its own dtype."""
    return model_dtype == file_dtype or (model_dtype.is_floating_point and file_dtype.is_floating_point)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Bool tensor of any shape (read row-major) -> ``[ceil(numel / 8)]`` uint8, bit ``i % 8`` of byte ``i // 8``
    (:func:`alq_lightning.core.bitwise.pack_bits`, the layout bitwise execution reads)."""
    return pack_rows(flags.reshape(-1))


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


def _check_fields(entry: Any, where: str, fields: dict[str, type]) -> None:
    """ValueError unless ``entry`` is a dict holding every key of ``fields`` with a value of its type
    (integers: not bool, >= 0)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a {type(entry).__name__}, not a JSON object")
    for key, kind in fields.items():
        if key not in entry:
            raise ValueError(f"{where} lacks {key!r}")
        value = entry[key]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind) or (kind is int and value < 0):
            allowed = "an integer >= 0" if kind is int else f"a {_JSON_TYPES[kind]}"
            raise ValueError(f"{where}: {key}={value!r} must be {allowed}")


def _check_shape(shape: list, where: str, low: int) -> tuple[int, ...]:
    if not all(isinstance(size, int) and not isinstance(size, bool) and size >= low for size in shape):
        raise ValueError(f"{where}: shape={shape!r} must list integers >= {low}")
    return tuple(shape)


def _check_dtype(name: str, where: str, key: str = "dtype") -> torch.dtype:
    try:
        return parse_dtype(name)
    except ValueError as error:
        raise ValueError(f"{where}: {key}: {error}") from None


def _check_section(entry: dict[str, Any], where: str, start: int, length: int, given_by: str,
                   payload_bytes: int) -> int:
    """The end of a section that must span ``[start, start + length)`` of the payload (``length`` as
    ``given_by`` says); else ValueError."""
    _check_fields(entry, where, _SECTION_FIELDS)
    if entry["offset"] != start:
        raise ValueError(f"{where} starts at byte {entry['offset']}, expected {start} (sections follow each other)")
    if entry["length"] != length:
        raise ValueError(f"{where} is {entry['length']} bytes, {given_by} give {length}")
    if start + length > payload_bytes:
        raise ValueError(f"{where} ends at byte {start + length}, past the end of the {payload_bytes}-byte payload")
    return start + length


def _unique_name(entry: dict[str, Any], kind: str, names: set[str]) -> str:
    """``"<kind> '<name>'"`` for messages, after checking the name is new to ``names`` (then added)."""
    where = f"{kind} {entry['name']!r}"
    if entry["name"] in names:
        raise ValueError(f"{where} appears twice")
    names.add(entry["name"])
    return where


def _fits_float32(value: Any) -> bool:
    """Whether the JSON value ``value`` is a number (not a boolean) that stays finite as a float32: a check in
    float64 would pass ``1e39``, which loads as ``inf``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(_FLOAT32.unpack(_FLOAT32.pack(float(value)))[0])
    except OverflowError:  # beyond float64 (a long integer), or rounding to float32 gives inf
        return False


def activation_rows(entry: dict[str, Any]) -> int:
    """``C``, the rows of the (checked) ``activations`` of a header layer entry."""
    activations = entry["activations"]
    return len(activations["coords"]) // activations["act_bits"]


def _check_activations(entry: Any, where: str, shape: tuple[int, ...]) -> None:
    """ValueError unless ``entry`` is an ``activations`` object of a layer of weight ``shape``: ``act_bits`` in
    ``[1, MAX_ACT_BITS]``, ``signed`` a boolean, ``coords`` ``C·J`` numbers finite in float32 with ``C`` 1 or the
    layer's input channels (a 2-d weight's ``shape[1]``; a Conv's ``shape[1]`` times its groups, which the header
    does not give: a multiple of ``shape[1]``)."""
    where = f"{where} activations"
    _check_fields(entry, where, _ACTIVATION_FIELDS)
    act_bits, coords = entry["act_bits"], entry["coords"]
    if not 1 <= act_bits <= MAX_ACT_BITS:
        raise ValueError(f"{where}: act_bits={act_bits} must be an integer in [1, {MAX_ACT_BITS}]")
    for index, value in enumerate(coords):
        if not _fits_float32(value):
            raise ValueError(f"{where}: coords[{index}]={value!r} must be a number that is finite in float32 (the "
                             f"dtype input coordinates load into)")
    if not coords or len(coords) % act_bits:
        raise ValueError(f"{where}: coords holds {len(coords)} numbers, not a positive multiple of "
                         f"act_bits={act_bits}")
    rows = len(coords) // act_bits
    channels = shape[1] if len(shape) > 1 else 0
    if rows != 1 and not (rows == channels or (len(shape) > 2 and rows % channels == 0)):
        expected = f"{channels}" if len(shape) == 2 else f"a multiple of {channels} (its input channels)"
        raise ValueError(f"{where}: coords holds {rows} rows of act_bits={act_bits}, expected 1 or {expected}")


def check_header(header: Any, payload: torch.Tensor, version: int = FORMAT_VERSION) -> None:
    """Raise ValueError naming the first part of ``header`` that does not describe ``payload`` (``[P]`` uint8)
    as :func:`export_packed` lays it out in format ``version``.

    Checked: required keys and their types; ``coord_bits`` and ``coord_dtype``; per layer, ``structure`` on
    ``shape`` (:func:`~alq_lightning.core.auto_layout`) giving its ``num_groups`` and ``group_size``, ``max_bits``
    in range, ``weight_dtype``, section lengths from ``G``, ``n``, ``K``, ``live_slots`` and the coord dtype,
    ``live_slots`` equal to the live bits of its mask, finite live coordinates, its ``activations`` (version 2
    on; refused before); per float tensor, its dtype and
    ``numel · itemsize`` bytes; names unique; sections following each other from byte 0 to the payload's end,
    ``quantized_bytes`` and ``float_bytes`` their sums.
    """
    _check_fields(header, "the header", _HEADER_FIELDS)
    coord_bits, size = header["coord_bits"], payload.numel()
    if coord_bits not in COORD_DTYPES:
        raise ValueError(f"coord_bits={coord_bits!r} must be one of {tuple(COORD_DTYPES)}")
    coord_dtype = COORD_DTYPES[coord_bits]
    if header["coord_dtype"] != dtype_name(coord_dtype):
        raise ValueError(f"coord_dtype={header['coord_dtype']!r} must be {dtype_name(coord_dtype)!r} with "
                         f"coord_bits={coord_bits}")
    cursor, names = 0, set()
    for index, entry in enumerate(header["layers"]):
        _check_fields(entry, f"layers[{index}]", _LAYER_FIELDS)
        where = _unique_name(entry, "layer", names)
        shape = _check_shape(entry["shape"], where, 1)
        try:
            layout = auto_layout(shape, entry["structure"])
            check_max_bits(entry["max_bits"])
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if not _check_dtype(entry["weight_dtype"], where, "weight_dtype").is_floating_point:
            raise ValueError(f"{where}: weight_dtype={entry['weight_dtype']!r} must be a floating-point dtype")
        groups, group_size, max_bits, live = (entry[key] for key in ("num_groups", "group_size", "max_bits",
                                                                     "live_slots"))
        if (layout.num_groups, layout.group_size) != (groups, group_size):
            raise ValueError(f"{where}: {layout.describe()} on {layout.shape} gives {layout.num_groups} groups of "
                             f"{layout.group_size}, the entry says num_groups={groups}, group_size={group_size}")
        starts = {}
        for key, length in zip(LAYER_SECTIONS, section_lengths(groups, group_size, max_bits, live, coord_dtype)):
            starts[key] = cursor
            cursor = _check_section(entry[key], f"{where} {key}", cursor, length, _LAYER_SIZES, size)
        found = int(unpack_bits(payload[starts["mask"]: starts["bases"]], groups * max_bits).sum())
        if found != live:
            raise ValueError(f"{where}: live_slots={live}, its mask has {found} live slots")
        if not payload[starts["coords"]: cursor].clone().view(coord_dtype).isfinite().all():
            raise ValueError(f"{where}: a live coordinate is not finite")
        if "activations" in entry:
            if version < ACTIVATIONS_VERSION:
                raise ValueError(f"{where} has activations, which format version {version} does not have (a "
                                 f"reader of version {version} would compute with float inputs); such a file must "
                                 f"say version {ACTIVATIONS_VERSION}")
            _check_activations(entry["activations"], where, shape)
    if header["quantized_bytes"] != cursor:
        raise ValueError(f"quantized_bytes={header['quantized_bytes']}, the layer sections take {cursor}")
    names = set()
    for index, entry in enumerate(header["float"]):
        _check_fields(entry, f"float[{index}]", _FLOAT_FIELDS)
        where = _unique_name(entry, "float tensor", names)
        length = math.prod(_check_shape(entry["shape"], where, 0)) * _check_dtype(entry["dtype"], where).itemsize
        cursor = _check_section(entry, where, cursor, length, "its shape and dtype", size)
    if header["float_bytes"] != cursor - header["quantized_bytes"]:
        raise ValueError(f"float_bytes={header['float_bytes']}, the float sections take "
                         f"{cursor - header['quantized_bytes']}")
    if cursor != size:
        raise ValueError(f"the sections end at byte {cursor}, the payload has {size} bytes")
