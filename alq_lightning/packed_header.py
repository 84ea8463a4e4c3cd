"""Consistency of a packed file's JSON header with its payload (see :mod:`alq_lightning.export` for the layout)."""
from __future__ import annotations

import math
from typing import Any

import torch

from .core import auto_layout, check_max_bits
from .packing import COORD_DTYPES, dtype_name, parse_dtype, section_lengths, unpack_bits

LAYER_SECTIONS = ("mask", "bases", "coords")
_SECTION_FIELDS = {"offset": int, "length": int}
_HEADER_FIELDS = {"coord_bits": int, "coord_dtype": str, "quantized_bytes": int, "float_bytes": int, "layers": list,
                  "float": list}
_LAYER_FIELDS = {"name": str, "structure": str, "shape": list, "weight_dtype": str, "num_groups": int,
                 "group_size": int, "max_bits": int, "live_slots": int, **dict.fromkeys(LAYER_SECTIONS, dict)}
_FLOAT_FIELDS = {"name": str, "dtype": str, "shape": list, **_SECTION_FIELDS}
_LAYER_SIZES = "its num_groups, group_size, max_bits, live_slots and the coord_dtype"
_JSON_TYPES = {str: "string", list: "list", dict: "JSON object"}


def _check_fields(entry: Any, where: str, fields: dict[str, type]) -> None:
    """ValueError unless ``entry`` is a dict holding every key of ``fields`` with a value of its type
    (integers: not bool, >= 0)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a {type(entry).__name__}, not a JSON object")
    for key, kind in fields.items():
        if key not in entry:
            raise ValueError(f"{where} lacks {key!r}")
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 0):
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


def check_header(header: Any, payload: torch.Tensor) -> None:
    """Raise ValueError naming the first part of ``header`` that does not describe ``payload`` (``[P]`` uint8)
    as :func:`export_packed` lays it out.

    Checked: required keys and their types; ``coord_bits`` and ``coord_dtype``; per layer, ``structure`` on
    ``shape`` (:func:`~alq_lightning.core.auto_layout`) giving its ``num_groups`` and ``group_size``, ``max_bits``
    in range, ``weight_dtype``, section lengths from ``G``, ``n``, ``K``, ``live_slots`` and the coord dtype,
    ``live_slots`` equal to the live bits of its mask, finite live coordinates; per float tensor, its dtype and
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
