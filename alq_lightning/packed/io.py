"""Packed files on disk: ``export_packed(model, path)`` writes one, ``load_packed(path, model)`` reads one back
into a model; :func:`read_packed` verifies a file (size, checksum, header against payload) before anything reads it.
Activation quantizers (:mod:`alq_lightning.activations`) travel with their layers (format version 2).

The layout and the encoding are :mod:`alq_lightning.packed.format`'s; this module turns models into those bytes
and back, checking that a model fits a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..activations import (
    ACT_PREFIX,
    ActivationLayer,
    attach_activations,
    channels_of,
    detach_activations,
    has_input_quantizer,
    is_quantizable_input,
)
from ..core import GroupLayout, LayerBits, MultiBitState, auto_layout, average_bits, check_coord_bits
from ..files import check_target, write_atomic
from ..layers import (
    LayerSelection,
    attach,
    buffer_prefix,
    find_layers,
    first_non_finite,
    float_remainder,
    resolve,
    sharded_layers,
)
from ..sharded import export_gathered
from ..summary import BitSummary, FloatRow, LayerRow, bit_summary
from .format import (
    ACTIVATIONS_VERSION,
    CHECKSUM_BYTES,
    COORD_DTYPES,
    FORMAT_VERSION,
    LAYER_SECTIONS,
    MAGIC,
    PREAMBLE,
    check_header,
    decode_layer,
    dtype_name,
    encode_layer,
    parse_dtype,
    takes_dtype,
    tensor_bytes,
)


@dataclass(frozen=True)
class ExportReport:
    """Byte counts of one packed file: ``total_bytes = header + quantized + float + checksum = file_bytes``."""

    path: str
    coord_bits: int
    avg_bits: float
    quantized_bytes: int
    float_bytes: int
    header_bytes: int
    checksum_bytes: int
    total_bytes: int
    file_bytes: int

    def __str__(self) -> str:
        return (f"{self.path}: {self.file_bytes} bytes = quantized layers {self.quantized_bytes} "
                f"+ float remainder {self.float_bytes} + header {self.header_bytes} + checksum {self.checksum_bytes}"
                f" ({self.avg_bits:.4f} avg bits, {self.coord_bits}-bit coords)")


@dataclass(frozen=True)
class PackedFile:
    """A verified packed file: its JSON ``header``, ``payload`` (``[P]`` uint8, from the first layer on) and
    format ``version``."""

    header: dict[str, Any]
    payload: torch.Tensor
    version: int = 1

    def section(self, entry: dict[str, Any]) -> torch.Tensor:
        """The ``[length]`` uint8 bytes of a (verified) header entry's ``{"offset", "length"}``."""
        return self.payload[entry["offset"]: entry["offset"] + entry["length"]]


def export_packed(model: nn.Module, path: str | os.PathLike, coord_bits: int = 32) -> ExportReport:
    """Write the multi-bit layers and float remainder of ``model`` to ``path`` (atomically) in the layout of
    :mod:`alq_lightning.packed.format`.

    A model sharded by FSDP2 (``fully_shard``, its state attached by ALQ) needs the call on every process: the state
    and the float remainder are gathered onto rank 0, which writes the file a single process writes from the same
    weights; every process returns the report."""
    path = check_target(path)
    check_coord_bits(coord_bits)
    shards = sharded_layers(model)
    if shards:
        return export_gathered(model, shards, lambda records, floats: write_packed(
            path, coord_bits, check_finite(records, floats), floats, activation_entries(model)))
    broken = first_non_finite(model)
    if broken is not None:
        raise ValueError(f"{broken} of the model is not finite: a packed file holds only finite weights")
    bit_summary(model, coord_bits)  # refuses a model without multi-bit layers
    layers = find_layers(model)
    return write_packed(path, coord_bits, {name: (layer.layout, layer.state, layer.param.dtype)
                                           for name, layer in layers.items()},
                        float_remainder(model, layers), activation_entries(model))


def check_finite(layers: dict[str, tuple[GroupLayout, MultiBitState, torch.dtype]],
                 remainder: dict[str, torch.Tensor]) -> dict[str, tuple[GroupLayout, MultiBitState, torch.dtype]]:
    """``layers``, or ValueError naming the first float tensor of ``remainder`` or layer's coordinates that is not
    finite (as :func:`~alq_lightning.layers.first_non_finite`, on gathered whole tensors)."""
    tensors = {f"parameter {key!r}": tensor for key, tensor in remainder.items() if tensor.is_floating_point()}
    tensors |= {f"coordinates of layer {name!r}": state.coords for name, (_, state, _) in layers.items()}
    broken = next((name for name, tensor in tensors.items() if not bool(tensor.isfinite().all())), None)
    if broken is not None:
        raise ValueError(f"{broken} of the model is not finite: a packed file holds only finite weights")
    return layers


def write_packed(path: Path, coord_bits: int, layers: dict[str, tuple[GroupLayout, MultiBitState, torch.dtype]],
                 remainder: dict[str, torch.Tensor], quantizers: dict[str, dict[str, Any]]) -> ExportReport:
    """Write ``{layer: (layout, state, weight dtype)}``, the float ``remainder`` and the input ``quantizers``
    (:func:`activation_entries`) to ``path``."""
    coord_dtype = COORD_DTYPES[check_coord_bits(coord_bits)]
    chunks, entries, offset, bits = [], [], 0, []
    for name, (layout, state, weight_dtype) in layers.items():
        try:
            parts = encode_layer(state, coord_dtype)
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from None
        bits.append(LayerBits.of(state.mask, layout.group_size))
        entry = {"name": name, "structure": layout.describe(), "shape": list(layout.shape),
                 "weight_dtype": dtype_name(weight_dtype), "num_groups": layout.num_groups,
                 "group_size": layout.group_size, "max_bits": state.max_bits, "live_slots": bits[-1].live_slots}
        for key, part in zip(LAYER_SECTIONS, parts):
            chunks.append(tensor_bytes(part))
            entry[key] = {"offset": offset, "length": len(chunks[-1])}
            offset += len(chunks[-1])
        if name in quantizers:
            entry["activations"] = quantizers.pop(name)
        entries.append(entry)
    if quantizers:
        raise ValueError(f"the input of layer {next(iter(quantizers))!r} is quantized but its weight is not: a packed "
                         f"file holds activation quantizers only beside quantized weights")
    quantized_bytes = offset
    storage_bytes = sum(layer.storage_bytes(coord_bits) for layer in bits)
    if quantized_bytes != storage_bytes:
        raise RuntimeError(f"packed layers take {quantized_bytes} bytes, the accounting says {storage_bytes}")
    floats = []
    for key, tensor in remainder.items():
        chunks.append(tensor_bytes(tensor))
        floats.append({"name": key, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
                       "offset": offset, "length": len(chunks[-1])})
        offset += len(chunks[-1])
    header = {"coord_bits": coord_bits, "coord_dtype": dtype_name(coord_dtype), "quantized_bytes": quantized_bytes,
              "float_bytes": offset - quantized_bytes, "layers": entries, "float": floats}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    total = PREAMBLE.size + len(text) + offset + CHECKSUM_BYTES
    version = ACTIVATIONS_VERSION if any("activations" in entry for entry in entries) else 1
    chunks[:0] = [PREAMBLE.pack(MAGIC, version, len(text), total), text]
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    chunks.append(digest.digest())
    write_atomic(path, lambda handle: handle.writelines(chunks))
    return ExportReport(str(path), coord_bits, average_bits(bits), quantized_bytes, offset - quantized_bytes,
                        PREAMBLE.size + len(text), CHECKSUM_BYTES, total, os.path.getsize(path))


def activation_entries(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer: {"act_bits", "signed", "coords"}}`` (the header's ``activations``) of every module of ``model``
    whose input quantizer is attached (:func:`~alq_lightning.activations.attach_activations`); ValueError naming a
    layer whose quantizer is not fitted yet or holds a coordinate that is not finite."""
    entries = {}
    for name, module in model.named_modules():
        if not has_input_quantizer(module):
            continue
        coords = getattr(module, ACT_PREFIX + "coords").view(torch.float32)
        if not bool(getattr(module, ACT_PREFIX + "ready")):
            raise ValueError(f"the input quantizer of layer {name!r} is attached but not fitted (no training batch "
                             f"has fitted it): train with its activations on, or remove its hooks, before export")
        if not coords.isfinite().all():
            raise ValueError(f"the input quantizer of layer {name!r} has a coordinate that is not finite")
        # float32 -> Python float (exact) -> JSON's shortest round-trip decimal -> the same float32 on reading
        entries[name] = {"act_bits": coords.shape[1], "signed": bool(getattr(module, ACT_PREFIX + "signed")),
                         "coords": coords.detach().cpu().reshape(-1).tolist()}
    return entries


def check_activations(header: dict[str, Any], modules: dict[str, tuple[nn.Module, str]]) -> None:
    """ValueError unless every layer with ``activations`` in the file is a Linear or Conv ``weight`` of the model
    whose input channels match the file's coordinate rows."""
    for entry in header["layers"]:
        if "activations" not in entry:
            continue
        name, (module, attr) = entry["name"], modules[entry["name"]]
        if attr != "weight" or not is_quantizable_input(module):
            raise ValueError(f"layer {name!r} has an input quantizer in the file, but the model's {name!r} is a "
                             f"{type(module).__name__} parameter {attr!r}, not the weight of a Linear or Conv")
        rows = len(entry["activations"]["coords"]) // entry["activations"]["act_bits"]
        if rows not in (1, channels_of(module)):
            raise ValueError(f"layer {name!r}: the file's input quantizer has {rows} coordinate rows, the model's "
                             f"layer has {channels_of(module)} input channels")


def restore_activations(model: nn.Module, quantizers: dict[str, dict[str, Any]]) -> dict[str, ActivationLayer]:
    """Attach and load the input quantizers ``{layer: {"coords" [C, J] float32, "signed", "ready"}}`` (layers
    named as the model's Linear/Conv modules, or their weights), switched on; every other module's quantizer
    hooks are removed, so that the model computes as the one they came from. The modules may hold their weights
    in packed form (:class:`~alq_lightning.packed.inference.PackedModel`)."""
    layers, named = {}, dict(model.named_modules())
    for name, tensors in quantizers.items():
        module = named.get(name)
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            raise ValueError(f"the input quantizer of layer {name!r} has no Linear or Conv module of that name in "
                             f"the model")
        coords = torch.as_tensor(tensors["coords"])
        coords = coords.view(torch.float32) if coords.dtype == torch.int32 else coords.float()
        if coords.dim() != 2 or coords.shape[0] not in (1, channels_of(module)):
            raise ValueError(f"the input quantizer of layer {name!r} has coordinates {tuple(coords.shape)}, expected "
                             f"[1 or {channels_of(module)} channels, act_bits]")
        layer = attach_activations({name: module}, coords.shape[1], per_channel=coords.shape[0] > 1)[name]
        layer.load({"coords": coords.to(module.weight.device),
                    "signed": torch.as_tensor(bool(tensors["signed"])),
                    "ready": torch.as_tensor(bool(tensors["ready"]))})
        layer.enabled = True
        layers[name] = layer
    kept = {id(layer.module) for layer in layers.values()}
    for module in model.modules():
        if id(module) not in kept and getattr(module, "_alq_act_handles", ()):
            detach_activations(module)
    return layers


def file_quantizers(header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The input quantizers of a (checked) header, as :func:`restore_activations` takes them."""
    quantizers = {}
    for entry in header["layers"]:
        if "activations" in entry:
            acts = entry["activations"]
            coords = torch.tensor(acts["coords"], dtype=torch.float32).view(-1, acts["act_bits"])
            quantizers[entry["name"]] = {"coords": coords, "signed": acts["signed"], "ready": True}
    return quantizers


def float_tensors_for(packed: PackedFile, remainder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's float tensors that the model's ``remainder`` takes (files written before shared weights
    were stored once also hold those weights' other names, which their layer already gives); ValueError naming a
    tensor with a finite value that the model's narrower dtype would hold as ``inf``."""
    tensors = {key: tensor for key, tensor in float_tensors(packed).items() if key in remainder}
    for key, tensor in tensors.items():
        dtype = remainder[key].dtype
        if tensor.is_floating_point() and dtype != tensor.dtype:
            lost = tensor.isfinite() & ~tensor.to(dtype).isfinite()
            if lost.any():
                raise ValueError(f"tensor {key!r} holds {tensor[lost][0].item():g} in the file "
                                 f"({dtype_name(tensor.dtype)}), which the model's {dtype_name(dtype)} cannot hold "
                                 f"(it would load as inf)")
    return tensors


def _read_preamble(path: Path, data: bytes) -> tuple[int, int, int]:
    """``(header length, file size, version)`` from the first bytes of ``data``, after magic and version checks."""
    if len(data) < 10 or data[:8] != MAGIC:
        raise ValueError(f"{path} is not an ALQ packed file (bad magic bytes)")
    version = struct.unpack("<H", data[8:10])[0]
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has packed format version {version}; this alq_lightning reads versions up to "
                         f"{FORMAT_VERSION}: upgrade alq_lightning to load it")
    if version < 1:
        raise ValueError(f"{path} has packed format version {version}, which does not exist")
    if len(data) < PREAMBLE.size:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than the {PREAMBLE.size}-byte preamble")
    _, _, header_length, file_size = PREAMBLE.unpack(data[:PREAMBLE.size])
    return header_length, file_size, version


def _parse_header(path: Path, text: bytes) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path}: its header is not UTF-8 JSON ({error})") from None


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a packed file, read alone (neither checksummed nor checked against the payload)."""
    path = Path(path)
    with open(path, "rb") as handle:
        header_length, _, _ = _read_preamble(path, handle.read(PREAMBLE.size))
        text = handle.read(header_length)
    if len(text) < header_length:
        raise ValueError(f"{path} is truncated inside its header")
    return _parse_header(path, text)


def read_packed(path: str | os.PathLike) -> PackedFile:
    """Read and verify ``path``: magic, version, size (truncation), SHA-256 checksum (corruption) and the
    header against the payload (:func:`check_header`)."""
    path = Path(path)
    data = path.read_bytes()
    header_length, file_size, version = _read_preamble(path, data)
    if len(data) != file_size:
        state = "truncated" if len(data) < file_size else "longer than written"
        raise ValueError(f"{path} is {state}: {len(data)} bytes, its preamble says {file_size}")
    if hashlib.sha256(data[:-CHECKSUM_BYTES]).digest() != data[-CHECKSUM_BYTES:]:
        raise ValueError(f"{path} is corrupted: its SHA-256 checksum does not match its contents")
    start = PREAMBLE.size + header_length
    if start + CHECKSUM_BYTES > file_size:
        raise ValueError(f"{path}: its {header_length}-byte header does not fit in the {file_size}-byte file")
    header = _parse_header(path, data[PREAMBLE.size:start])
    body = bytearray(data[start:-CHECKSUM_BYTES])
    payload = torch.frombuffer(body, dtype=torch.uint8) if body else torch.empty(0, dtype=torch.uint8)
    try:
        check_header(header, payload, version)
    except ValueError as error:
        raise ValueError(f"{path} has an inconsistent header: {error}") from None
    return PackedFile(header, payload, version)


def check_model(header: dict[str, Any], model: nn.Module,
                attached_must_match: bool = True) -> dict[str, tuple[nn.Module, str]]:
    """Raise ValueError naming the first way ``model`` differs from the file; else ``{layer name: (module,
    parameter attribute)}``.

    With ``attached_must_match``, a layer that already carries multi-bit state must have the file's structure
    and ``max_bits``, and every such layer must be in the file.
    """
    found = {}
    for entry in header["layers"]:
        name, shape = entry["name"], tuple(entry["shape"])
        target = resolve(model, name)
        if target is None:
            raise ValueError(f"quantized layer {name!r} of the file is missing from the model (it has no weight "
                             f"parameter of that name)")
        module, attr = target
        param = getattr(module, attr)
        if tuple(param.shape) != shape:
            raise ValueError(f"layer {name!r}: the model's weight is {tuple(param.shape)}, the file's {shape}")
        mask = getattr(module, buffer_prefix(attr) + "mask", None)
        structure = getattr(module, buffer_prefix(attr) + "structure", None)
        layout = auto_layout(shape, entry["structure"])
        same = structure is not None and auto_layout(shape, structure).same_groups(layout)
        expected = (entry["num_groups"], entry["max_bits"])
        if attached_must_match and isinstance(mask, torch.Tensor) and not (same and tuple(mask.shape) == expected):
            raise ValueError(f"layer {name!r} is attached as {structure} with mask {tuple(mask.shape)}; the "
                             f"file has {entry['structure']} with {entry['num_groups']} groups x "
                             f"{entry['max_bits']} bits")
        found[name] = target
    if attached_must_match:
        extra = [name for name in find_layers(model) if name not in found]
        if extra:
            raise ValueError(f"layer {extra[0]!r} of the model carries multi-bit state, the file stores it in float")
    stored = {entry["name"]: entry for entry in header["float"]}
    remainder = float_remainder(model, found)
    for key, tensor in remainder.items():
        if key not in stored:
            raise ValueError(f"the model's tensor {key!r} is not in the file")
        if tuple(tensor.shape) != tuple(stored[key]["shape"]):
            raise ValueError(f"tensor {key!r} is {tuple(tensor.shape)} in the model, {tuple(stored[key]['shape'])} "
                             f"in the file")
        if not takes_dtype(tensor.dtype, parse_dtype(stored[key]["dtype"])):
            raise ValueError(f"tensor {key!r} is {dtype_name(tensor.dtype)} in the model, {stored[key]['dtype']} in "
                             f"the file: a floating-point tensor takes floating-point values only, any other tensor "
                             f"its own dtype only")
    shared = set(model.state_dict()) - set(remainder)
    unknown = [key for key in stored if key not in remainder and key not in shared]
    if unknown:
        raise ValueError(f"the file's tensor {unknown[0]!r} is not in the model")
    return found


def decode_entry(packed: PackedFile, entry: dict[str, Any]) -> MultiBitState:
    """The multi-bit state of one header layer entry; coordinates in float32 (exact for both stored precisions)."""
    return decode_layer(*(packed.section(entry[key]).clone() for key in LAYER_SECTIONS), entry["num_groups"],
                        entry["group_size"], entry["max_bits"], parse_dtype(packed.header["coord_dtype"]),
                        torch.float32)


def float_tensors(packed: PackedFile) -> dict[str, torch.Tensor]:
    """The float remainder ``{state_dict key: tensor}``."""
    return {entry["name"]: packed.section(entry).clone().view(parse_dtype(entry["dtype"])).reshape(entry["shape"])
            for entry in packed.header["float"]}


def load_packed(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a packed file into ``model`` (same architecture) and return it.

    The file is verified (:func:`read_packed`), checked against the model and decoded in memory before the
    model is touched: a bad file or a wrong model raises ValueError and leaves ``model`` as it was. Layers
    without multi-bit buffers get them (:func:`alq_lightning.layers.attach` with the file's structures);
    codes, coordinates and masks are written (dead slots canonical: ``α = 0``, ``β = +1``), AMSGrad statistics
    and latent weights are zeroed, the dense weights are set to the reconstruction and the float remainder is
    loaded. Coordinates take the stored values exactly (float16-rounded when exported with ``coord_bits=16``).
    A file's input quantizers are attached to their layers, loaded and switched on (other modules' quantizer
    hooks are removed); like any fitted quantizer, one refits its coordinates on a forward in training mode with
    gradients enabled.
    """
    packed = read_packed(path)
    modules = check_model(packed.header, model)
    check_activations(packed.header, modules)
    entries = {entry["name"]: entry for entry in packed.header["layers"]}
    states = {name: decode_entry(packed, entry) for name, entry in entries.items()}
    floats = float_tensors_for(packed, float_remainder(model, modules))
    missing = [name for name, (module, attr) in modules.items()
               if not isinstance(getattr(module, buffer_prefix(attr) + "mask", None), torch.Tensor)]
    if missing:
        attach(model, LayerSelection(
            max_bits=entries[missing[0]]["max_bits"], include=missing,
            structures={name: entries[name]["structure"] for name in missing},
            max_bits_overrides={name: entries[name]["max_bits"] for name in missing},
        ))
    layers = find_layers(model)
    with torch.no_grad():
        for name, state in states.items():
            layers[name].load_state(state)
        model.load_state_dict(floats, strict=False)
    restore_activations(model, file_quantizers(packed.header))
    return model


def packed_summary(header: dict[str, Any]) -> BitSummary:
    """The :class:`BitSummary` of a packed file, from its header alone (activation bits, but no BOPs: those need
    a forward pass)."""
    rows = tuple(
        LayerRow(entry["name"], tuple(entry["shape"]), entry["structure"],
                 LayerBits(entry["num_groups"] * entry["group_size"], entry["num_groups"], entry["group_size"],
                           entry["max_bits"], entry["live_slots"]), header["coord_bits"],
                 entry.get("activations", {}).get("act_bits", 0))
        for entry in header["layers"]
    )
    floats = tuple(FloatRow(entry["name"], tuple(entry["shape"]), parse_dtype(entry["dtype"]))
                   for entry in header["float"])
    return BitSummary(rows, header["coord_bits"], floats)
