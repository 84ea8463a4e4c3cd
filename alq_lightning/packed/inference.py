"""Inference straight from the packed form: dense weights exist one quantized layer at a time.

``load_packed_for_inference(path, model_or_factory)`` returns a :class:`PackedModel`. Each quantized parameter
keeps only its packed bytes (uint8 buffers ``alq_packed_mask``, ``alq_packed_bases``, ``alq_packed_coords`` for
a module's ``weight``, ``alq_packed_<parameter>_*`` for another parameter; they follow ``.to()``); the
parameter itself is an empty buffer between calls. A forward pre-hook of its module unpacks it and sets it
to its dense reconstruction ŵ for that call; a forward hook (also run when the forward raises) empties it
again.

Peak memory ≈ packed bytes (the file's ``quantized_bytes``) + the float remainder + one layer's dense
weight and its unpacking intermediates (``codes [G, n]`` uint8, live bits ``[L, n]`` bool, codebook
``[G, 2^K]``), plus activations. Outputs equal those of the model :func:`~alq_lightning.packed.io.load_packed`
gives, exactly (same reconstruction, same dtype, same device), except that attention runs on PyTorch's regular
path, not its fused fast path (``torch.backends.mha``), whose rounding differs.

A file's input quantizers (format version 2) are attached and switched on: those layers' inputs are quantized
as in training (a float simulation). With ``bitwise=True`` each such Linear and Conv2d runs as a bitwise
reference execution instead (:mod:`alq_lightning.packed.bitwise`): integer popcount dots of weight and
activation bases, equal to the float simulation up to float rounding.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core import GroupLayout, auto_layout
from ..core.multibit import compute_dtype
from ..layers import BUFFER_KEYS, buffer_prefix, float_remainder
from .bitwise import BITWISE_MODULES, check_bitwise, make_bitwise
from .format import LAYER_SECTIONS, decode_layer, parse_dtype
from .io import (
    PackedFile,
    check_activations,
    check_model,
    file_quantizers,
    float_tensors_for,
    read_packed,
    restore_activations,
)


@dataclass(frozen=True)
class PackedSpec:
    """What a quantized module needs to unpack its weight."""

    layout: GroupLayout
    max_bits: int
    coord_dtype: torch.dtype


def packed_prefix(attr: str) -> str:
    """Prefix of the packed buffers of parameter ``attr`` on its module."""
    return "alq_packed_" if attr == "weight" else f"alq_packed_{attr}_"


def dense_weight(module: nn.Module, attr: str = "weight") -> torch.Tensor:
    """The dense ŵ of packed parameter ``attr`` of ``module``, in the dtype and on the device of its buffer."""
    spec: PackedSpec = module.alq_packed[attr]
    dtype = getattr(module, attr).dtype
    prefix = packed_prefix(attr)
    with torch.no_grad():
        state = decode_layer(*(getattr(module, prefix + key) for key in LAYER_SECTIONS), spec.layout.num_groups,
                             spec.layout.group_size, spec.max_bits, spec.coord_dtype, compute_dtype(dtype))
        return spec.layout.from_groups(state.reconstruct()).to(dtype)


def _materialise(owner: nn.Module, args: Any) -> None:
    for module, attr in owner.alq_unpacks:
        setattr(module, attr, dense_weight(module, attr))


def _release(owner: nn.Module, args: Any, output: Any) -> None:
    for module, attr in owner.alq_unpacks:
        setattr(module, attr, getattr(module, attr).new_empty(0))


def pack_module(module: nn.Module, attr: str, packed: PackedFile, entry: dict[str, Any],
                owner: nn.Module | None = None) -> None:
    """Turn parameter ``attr`` of ``module`` into its packed form in place (its dense tensor and multi-bit
    buffers go); forward hooks of ``owner`` (default ``module``), the module whose call reads it, rebuild it
    for each call and empty it afterwards."""
    owner = module if owner is None else owner
    weight = getattr(module, attr)
    for key in BUFFER_KEYS + ("structure",):
        if hasattr(module, buffer_prefix(attr) + key):
            delattr(module, buffer_prefix(attr) + key)
    for key in LAYER_SECTIONS:
        module.register_buffer(packed_prefix(attr) + key, packed.section(entry[key]).clone().to(weight.device),
                               persistent=False)
    if not hasattr(module, "alq_packed"):
        module.alq_packed = {}
    module.alq_packed[attr] = PackedSpec(auto_layout(tuple(entry["shape"]), entry["structure"]), entry["max_bits"],
                                         parse_dtype(packed.header["coord_dtype"]))
    if not hasattr(owner, "alq_unpacks"):
        owner.alq_unpacks = []
        owner.register_forward_pre_hook(_materialise)
        owner.register_forward_hook(_release, always_call=True)
    owner.alq_unpacks.append((module, attr))
    delattr(module, attr)
    module.register_buffer(attr, weight.detach().new_empty(0), persistent=False)


def hook_owners(model: nn.Module) -> dict[int, nn.Module]:
    """``{id(module): owner}`` for modules whose weights another module's call reads without calling them:
    ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly."""
    return {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


class PackedModel(nn.Module):
    """``model`` with its quantized layers in packed form; ``forward`` is the model's forward.

    Build it with :func:`load_packed_for_inference`. ``packed_layers`` lists the quantized layers' names,
    ``activation_layers`` maps the layers whose input the file quantizes to their quantizers, ``bitwise_layers``
    lists those that run bitwise. Every module sharing a quantized layer's weight is packed with that layer's
    sections.
    """

    def __init__(self, model: nn.Module, packed: PackedFile, bitwise: bool = False) -> None:
        super().__init__()
        modules = check_model(packed.header, model, attached_must_match=False)
        check_activations(packed.header, modules)
        quantizers = file_quantizers(packed.header)
        bitwise_names = [name for name in quantizers if bitwise and isinstance(modules[name][0], BITWISE_MODULES)]
        entries = {entry["name"]: entry for entry in packed.header["layers"]}
        for name in bitwise_names:
            layout = auto_layout(tuple(entries[name]["shape"]), entries[name]["structure"])
            check_bitwise(name, modules[name][0], quantizers[name]["coords"], layout)
        self.model = model
        with torch.no_grad():
            model.load_state_dict(float_tensors_for(packed, float_remainder(model, modules)), strict=False)
        users: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for attr, param in module.named_parameters(recurse=False):
                users.setdefault(id(param), []).append((module, attr))
        owners = hook_owners(model)
        for entry in packed.header["layers"]:
            module, attr = modules[entry["name"]]
            for user, user_attr in users[id(getattr(module, attr))]:
                pack_module(user, user_attr, packed, entry, owners.get(id(user)))
        self.packed_layers = list(modules)
        self.activation_layers = restore_activations(model, quantizers)
        for name in bitwise_names:
            self.activation_layers[name].enabled = False  # the bitwise forward reads the raw input's codes
            make_bitwise(modules[name][0])
        self.bitwise_layers = bitwise_names
        self._targets = modules
        self.quantized_bytes = int(packed.header["quantized_bytes"])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # The fused fast path of nn.TransformerEncoderLayer reads its submodules' weights (linear1, norm1, ...)
        # without calling those submodules, so their pre-hooks would not unpack them.
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.model(*args, **kwargs)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)

    def packed_bytes(self) -> int:
        """Bytes held by the packed buffers of all quantized layers."""
        return sum(getattr(module, packed_prefix(attr) + key).numel()
                   for module, attr in self._targets.values() for key in LAYER_SECTIONS)


def load_packed_for_inference(path: str | os.PathLike, model_or_factory: nn.Module | Callable[[], nn.Module],
                              bitwise: bool = False) -> PackedModel:
    """A :class:`PackedModel` in eval mode from the packed file ``path``.

    ``model_or_factory`` is a model of the file's architecture (converted in place) or a callable returning
    one; it may or may not carry multi-bit buffers (they are dropped). The file is verified and the model
    checked against it before anything is changed. With ``bitwise=True`` every Linear and Conv2d whose input
    the file quantizes runs bitwise (:mod:`alq_lightning.packed.bitwise`; refused for per-channel input
    coordinates); other layers compute as without it.
    """
    if not isinstance(bitwise, bool):
        raise ValueError(f"bitwise={bitwise!r} must be True or False")
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    return PackedModel(model, read_packed(path), bitwise).eval()
