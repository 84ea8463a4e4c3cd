"""The committed golden files ``tests/golden/v{1,2}_tiny.alq`` read by a reader written here from the documented
layout.

The reader below uses only ``struct``, ``json``, ``hashlib``, plain-Python bit arithmetic and numpy, following
the format-version-1 layout in the docstring of :mod:`alq_lightning.packed.format` (bits least significant
first), version 2's ``activations`` entries of the header, and the group layouts of
:mod:`alq_lightning.core.layout`. Nothing from ``alq_lightning.packed`` serves
the decoding; ``load_packed``/``export_packed`` appear only as the things compared. A change of the bit order,
section order, header or byte layout that the library's own writer and reader make together therefore fails
here. Regenerate the golden files only for a new format version (``python tests/golden/make_golden.py``, which
refuses to overwrite).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from alq_lightning.activations import attach_activations
from alq_lightning.core import MultiBitState
from alq_lightning.layers import LayerSelection, attach
from alq_lightning.packed.format import FORMAT_VERSION
from alq_lightning.packed.inference import dense_weight, load_packed_for_inference
from alq_lightning.packed.io import export_packed, load_packed

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
_spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)

V1_FILE, V1_WEIGHTS = GOLDEN / "v1_tiny.alq", GOLDEN / "v1_tiny_weights.pt"
V2_FILE, V2_WEIGHTS = GOLDEN / "v2_tiny.alq", GOLDEN / "v2_tiny_weights.pt"
MAGIC, PREAMBLE_FORMAT, CHECKSUM = b"ALQPACK\0", "<8sHIQ", 32


def read_v1(path: Path) -> tuple[int, dict, bytes]:
    """``(version, header, payload)`` of a packed file, after the size and SHA-256 checks of the preamble."""
    data = path.read_bytes()
    magic, version, header_length, file_size = struct.unpack_from(PREAMBLE_FORMAT, data, 0)
    assert magic == MAGIC
    assert file_size == len(data)
    assert hashlib.sha256(data[:-CHECKSUM]).digest() == data[-CHECKSUM:]
    start = struct.calcsize(PREAMBLE_FORMAT)
    header = json.loads(data[start:start + header_length].decode("utf-8"))
    return version, header, data[start + header_length:-CHECKSUM]


def bits_lsb_first(raw: bytes, count: int) -> list[int]:
    """The first ``count`` bits of ``raw``, bit ``i`` being bit ``i % 8`` of byte ``i // 8``; padding must be 0."""
    assert len(raw) == math.ceil(count / 8)
    bits = [(raw[i // 8] >> (i % 8)) & 1 for i in range(8 * len(raw))]
    assert not any(bits[count:]), "padding bits are not zero"
    return bits[:count]


def section(payload: bytes, entry: dict) -> bytes:
    assert 0 <= entry["offset"] and entry["offset"] + entry["length"] <= len(payload)
    return payload[entry["offset"]:entry["offset"] + entry["length"]]


def groups_to_weight(groups: np.ndarray, structure: str, shape: list[int]) -> np.ndarray:
    """``[G, n]`` -> the weight, per the layout table: a kernelwise group is ``W[o, i]`` (one kernel), a
    pixelwise one ``W[o, :, tap]``, a channelwise one ``W[o]``; subchannelwise(S) cuts each row in S chunks."""
    name, subchannels = re.fullmatch(r"([a-z]+)(?:\((\d+)\))?", structure).groups()
    if name == "pixelwise":
        co, ci, *kernel = shape
        return np.moveaxis(groups.reshape(co, *kernel, ci), -1, 1)
    assert name in ("kernelwise", "channelwise", "subchannelwise")
    assert name != "subchannelwise" or int(subchannels) * groups.shape[1] == shape[1]
    return groups.reshape(shape)


def decode_layer_v1(payload: bytes, entry: dict, coord_dtype: str) -> dict[str, np.ndarray]:
    """One layer: ``mask [G, K]`` bool, ``signs [G, K, n]`` ±1 (0 on dead slots), ``coords [G, K]`` (0 on dead
    slots) and ``weight`` (ŵ, summed exactly in float64, in the layer's shape)."""
    num_groups, group_size, max_bits = entry["num_groups"], entry["group_size"], entry["max_bits"]
    mask = np.array(bits_lsb_first(section(payload, entry["mask"]), num_groups * max_bits), dtype=bool)
    mask = mask.reshape(num_groups, max_bits)
    live = [(g, k) for g in range(num_groups) for k in range(max_bits) if mask[g, k]]
    assert len(live) == entry["live_slots"]
    bits = bits_lsb_first(section(payload, entry["bases"]), len(live) * group_size)
    width = {"float32": 4, "float16": 2}[coord_dtype]
    raw_coords = section(payload, entry["coords"])
    assert len(raw_coords) == width * len(live)
    values = np.frombuffer(raw_coords, dtype=np.dtype(coord_dtype).newbyteorder("<"))
    signs = np.zeros((num_groups, max_bits, group_size), dtype=np.int64)
    coords = np.zeros((num_groups, max_bits), dtype=np.float64)
    for index, (g, k) in enumerate(live):
        signs[g, k] = [1 if bit else -1 for bit in bits[index * group_size:(index + 1) * group_size]]
        coords[g, k] = float(values[index])
    groups = (coords[:, :, None] * signs).sum(axis=1)
    return {"mask": mask, "signs": signs, "coords": coords,
            "weight": groups_to_weight(groups, entry["structure"], entry["shape"])}


def decode_float_v1(payload: bytes, entry: dict) -> np.ndarray:
    raw = section(payload, entry)
    return np.frombuffer(raw, dtype=np.dtype(entry["dtype"]).newbyteorder("<")).reshape(entry["shape"])


def decode_v1(path: Path, version: int = 1) -> tuple[dict, dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """``(header, {layer: decode_layer_v1}, {state_dict key: float remainder tensor})`` of a file of ``version``
    (1, or 2, whose payload is laid out as version 1's)."""
    got, header, payload = read_v1(path)
    assert got == version
    layers = {entry["name"]: decode_layer_v1(payload, entry, header["coord_dtype"]) for entry in header["layers"]}
    floats = {entry["name"]: decode_float_v1(payload, entry) for entry in header["float"]}
    return header, layers, floats


def to_float32(weight: np.ndarray) -> torch.Tensor:
    """The float64 ŵ as float32, which must lose nothing (the golden coordinates make every sum exact)."""
    single = weight.astype(np.float32)
    assert np.array_equal(single.astype(np.float64), weight)
    return torch.from_numpy(single)


def decode_activations_v2(header: dict) -> dict[str, dict[str, np.ndarray]]:
    """``{layer: {"coords" [C, J] float32, "signed" bool}}`` from the ``activations`` entries of a version-2
    header; every coordinate, a JSON number, must be a float32 exactly."""
    found = {}
    for entry in header["layers"]:
        if "activations" not in entry:
            continue
        acts = entry["activations"]
        act_bits, values = acts["act_bits"], acts["coords"]
        assert type(act_bits) is int and 1 <= act_bits <= 8 and type(acts["signed"]) is bool
        assert len(values) % act_bits == 0 and len(values) // act_bits in (1, entry["shape"][1])
        doubles = np.array(values, dtype=np.float64)
        singles = doubles.astype(np.float32)
        assert np.array_equal(singles.astype(np.float64), doubles), entry["name"]
        found[entry["name"]] = {"coords": singles.reshape(-1, act_bits), "signed": acts["signed"]}
    return found


def independent_state_dict(path: Path, version: int = 1) -> dict[str, torch.Tensor]:
    """Every ``state_dict`` tensor of the model in ``path``, decoded by this module's reader."""
    _, layers, floats = decode_v1(path, version)
    tensors = {f"{name}.weight": to_float32(layer["weight"]) for name, layer in layers.items()}
    return tensors | {key: torch.from_numpy(value.copy()) for key, value in floats.items()}


def saved() -> dict[str, torch.Tensor]:
    return torch.load(V1_WEIGHTS, weights_only=True)


def test_v1_header_says_version_1_and_sections_have_the_documented_sizes():
    """Preamble (magic, version 1, size, SHA-256); coord_bits 32; each layer's mask/bases/coords take
    ceil(G·K/8), ceil(L·n/8) and 4·L bytes; sections tile the payload in order; quantized + float bytes = payload;
    the file is a few KB and has pruned slots and wholly pruned groups in each layer."""
    version, header, payload = read_v1(V1_FILE)
    assert version == 1
    assert (header["coord_bits"], header["coord_dtype"]) == (32, "float32")
    assert [entry["name"] for entry in header["layers"]] == ["conv1", "conv2", "fc"]
    offset = 0
    for entry in header["layers"]:
        g, k, n, live = (entry[key] for key in ("num_groups", "max_bits", "group_size", "live_slots"))
        assert g * n == math.prod(entry["shape"])
        sizes = {"mask": math.ceil(g * k / 8), "bases": math.ceil(live * n / 8), "coords": 4 * live}
        for key in ("mask", "bases", "coords"):
            assert entry[key] == {"offset": offset, "length": sizes[key]}, (entry["name"], key)
            offset += sizes[key]
    assert offset == header["quantized_bytes"]
    for entry in header["float"]:
        assert entry["offset"] == offset and entry["length"] == np.dtype(entry["dtype"]).itemsize * math.prod(
            entry["shape"])
        offset += entry["length"]
    assert offset == header["quantized_bytes"] + header["float_bytes"] == len(payload)
    assert V1_FILE.stat().st_size < 4096
    for layer in decode_v1(V1_FILE)[1].values():
        mask = layer["mask"]
        assert not mask.all() and (~mask).all(axis=1).any() and mask.any(axis=1).any()


def test_v1_independent_decode_equals_the_saved_tensors():
    """Mask, signs (against the saved codes: bit k set iff β = +1), coordinates, ŵ and the float remainder
    decoded here equal, bit for bit, what the generator exported; nothing saved is left undecoded."""
    expected = saved()
    header, layers, floats = decode_v1(V1_FILE)
    for name, layer in layers.items():
        mask = expected[f"multibit/{name}/mask"]
        assert torch.equal(torch.from_numpy(layer["mask"]), mask), name
        assert torch.equal(torch.from_numpy(layer["coords"]).float(), expected[f"multibit/{name}/coords"]), name
        codes = expected[f"multibit/{name}/codes"].long()
        code_signs = 2 * ((codes[:, None, :] >> torch.arange(mask.shape[1])[None, :, None]) & 1) - 1
        assert torch.equal(torch.from_numpy(layer["signs"]), code_signs * mask[:, :, None]), name
    decoded = independent_state_dict(V1_FILE)
    assert set(decoded) | {key for key in expected if key.startswith("multibit/")} == set(expected)
    for key, value in decoded.items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key


def test_load_packed_gives_the_independent_decode_exactly():
    """``load_packed`` into a fresh model, and the packed-inference reconstruction, equal the weights and float
    remainder decoded here exactly."""
    decoded = independent_state_dict(V1_FILE)
    model = load_packed(V1_FILE, make_golden.TinyNet().eval())
    state = model.state_dict()
    assert set(state) == set(decoded)
    for key, value in decoded.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    packed = load_packed_for_inference(V1_FILE, make_golden.TinyNet)
    for name in packed.packed_layers:
        assert torch.equal(dense_weight(getattr(packed.model, name)), decoded[f"{name}.weight"]), name


def restore_saved_activations(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Attach and load the input quantizers saved under ``activations/<layer>/...`` (version 2 on)."""
    modules = dict(model.named_modules())
    for name in sorted({key.split("/")[1] for key in expected if key.startswith("activations/")}):
        coords = expected[f"activations/{name}/coords"]
        layer = attach_activations({name: modules[name]}, coords.shape[1], per_channel=coords.shape[0] > 1)[name]
        layer.load({"coords": coords, "signed": expected[f"activations/{name}/signed"], "ready": torch.tensor(True)})


def test_export_of_the_saved_state_writes_the_golden_bytes(tmp_path):
    """``export_packed`` of the saved multi-bit state and float tensors writes the committed golden file of the
    current format version byte for byte (a format change without a new version fails here)."""
    golden, weights = make_golden.golden_paths(FORMAT_VERSION)
    if not golden.exists():
        pytest.skip(f"no golden file of version {FORMAT_VERSION} (test_every_format_version_has_a_golden_file)")
    expected = torch.load(weights, weights_only=True)
    model = make_golden.TinyNet().eval()
    model.load_state_dict({key: value for key, value in expected.items() if "/" not in key})
    layers, _ = attach(model, LayerSelection(max_bits=4, structures=make_golden.STRUCTURES,
                                             max_bits_overrides=make_golden.MAX_BITS))
    for name, layer in layers.items():
        layer.load_state(MultiBitState(*(expected[f"multibit/{name}/{key}"] for key in ("codes", "coords", "mask"))))
    restore_saved_activations(model, expected)
    export_packed(model, tmp_path / "again.alq", coord_bits=32)
    assert (tmp_path / "again.alq").read_bytes() == golden.read_bytes()


def test_every_format_version_has_a_golden_file():
    """Each version up to ``FORMAT_VERSION`` has a committed golden file, and it still loads."""
    for version in range(1, FORMAT_VERSION + 1):
        packed, weights = make_golden.golden_paths(version)
        assert packed.exists() and weights.exists(), (
            f"FORMAT_VERSION is {FORMAT_VERSION} but {packed.name} / {weights.name} are missing from "
            f"tests/golden: add them with `python tests/golden/make_golden.py`, commit them, and extend "
            f"tests/packed/test_golden.py with an independent reader of version {version}")
        expected = torch.load(weights, weights_only=True)
        state = load_packed(packed, make_golden.TinyNet().eval()).state_dict()
        assert all(torch.equal(state[key], value) for key, value in expected.items() if key in state), packed.name


def test_v2_header_says_version_2_and_its_payload_is_laid_out_as_version_1():
    """Version 2 in the preamble; the payload decodes with the version-1 reader into the saved weights, codes
    and coordinates; the activations of conv2 (2 bits, ±1 codes, one row) and fc (3 bits, {0,1} codes, one row
    per input feature) sit in their header entries, and no other layer has any."""
    version, header, _ = read_v1(V2_FILE)
    assert version == 2
    expected = torch.load(V2_WEIGHTS, weights_only=True)
    _, layers, _ = decode_v1(V2_FILE, version=2)
    for name, layer in layers.items():
        assert torch.equal(torch.from_numpy(layer["mask"]), expected[f"multibit/{name}/mask"]), name
        assert torch.equal(torch.from_numpy(layer["coords"]).float(), expected[f"multibit/{name}/coords"]), name
    decoded = independent_state_dict(V2_FILE, version=2)
    assert set(decoded) == {key for key in expected if "/" not in key}
    for key, value in decoded.items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    activations = decode_activations_v2(header)
    assert {name: (acts["coords"].shape, acts["signed"]) for name, acts in activations.items()} == {
        "conv2": ((1, 2), True), "fc": ((16, 3), False)}


def test_v2_independent_activations_equal_the_saved_quantizers():
    """The coordinates read from the JSON header equal the saved float32 tensors bit for bit, row-major
    ``[C, J]``; ``signed`` equals the saved flag; ``load_packed`` and the packed-inference model restore the same
    quantizers, switched on."""
    expected = torch.load(V2_WEIGHTS, weights_only=True)
    activations = decode_activations_v2(read_v1(V2_FILE)[1])
    for name, acts in activations.items():
        assert torch.equal(torch.from_numpy(acts["coords"]), expected[f"activations/{name}/coords"]), name
        assert acts["signed"] == bool(expected[f"activations/{name}/signed"]), name
    loaded = load_packed(V2_FILE, make_golden.TinyNet().eval())
    packed = load_packed_for_inference(V2_FILE, make_golden.TinyNet)
    assert set(packed.activation_layers) == set(activations)
    for model in (loaded, packed.model):
        modules = dict(model.named_modules())
        for name, acts in activations.items():
            module = modules[name]
            assert torch.equal(module.alq_act_coords.view(torch.float32), expected[f"activations/{name}/coords"])
            assert bool(module.alq_act_signed) == acts["signed"] and bool(module.alq_act_ready)
    assert all(layer.enabled for layer in packed.activation_layers.values())
