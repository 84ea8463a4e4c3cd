"""Inference straight from the packed form: dense weights exist one quantized layer at a time.

``load_packed_for_inference(path, model_or_factory)`` returns a :class:`PackedModel`. Each quantized module
keeps only its packed bytes (uint8 buffers ``alq_packed_mask``, ``alq_packed_bases``, ``alq_packed_coords``,
which follow ``.to()``); its ``weight`` is an empty buffer between calls. A forward pre-hook unpacks the
layer and sets ``weight`` to its dense reconstruction ŵ for that call; a forward hook (also run when the
forward raises) empties it again.

Peak memory ≈ packed bytes (the file's ``quantized_bytes``) + the float remainder + one layer's dense
weight and its unpacking intermediates (``codes [G, n]`` uint8, live bits ``[L, n]`` bool, codebook
``[G, 2^K]``), plus activations. Outputs equal those of the model :func:`~alq_lightning.export.load_packed`
gives, exactly (same reconstruction, same dtype, same device).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .core import GroupLayout, auto_layout
from .core.multibit import compute_dtype
from .export import PackedFile, check_model, float_remainder, float_tensors_for, read_packed
from .packed_header import LAYER_SECTIONS
from .packing import decode_layer, parse_dtype


@dataclass(frozen=True)
class PackedSpec:
    """What a quantized module needs to unpack its weight."""

    layout: GroupLayout
    max_bits: int
    coord_dtype: torch.dtype


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight ŵ of a packed module, in the dtype and on the device of its ``weight`` buffer."""
    spec: PackedSpec = module.alq_packed
    dtype = module.weight.dtype
    with torch.no_grad():
        state = decode_layer(module.alq_packed_mask, module.alq_packed_bases, module.alq_packed_coords,
                             spec.layout.num_groups, spec.layout.group_size, spec.max_bits, spec.coord_dtype,
                             compute_dtype(dtype))
        return spec.layout.from_groups(state.reconstruct()).to(dtype)


def _materialise(module: nn.Module, args: Any) -> None:
    module.weight = dense_weight(module)


def _release(module: nn.Module, args: Any, output: Any) -> None:
    module.weight = module.weight.new_empty(0)


def pack_module(module: nn.Module, packed: PackedFile, entry: dict[str, Any]) -> None:
    """Turn one quantized module into its packed form in place (its dense weight and multi-bit buffers go)."""
    weight = module.weight
    for key, _ in list(module.named_buffers(recurse=False)):
        if key.startswith("alq_"):
            delattr(module, key)
    for key in LAYER_SECTIONS:
        module.register_buffer(f"alq_packed_{key}", packed.section(entry[key]).clone().to(weight.device),
                               persistent=False)
    module.alq_packed = PackedSpec(auto_layout(tuple(entry["shape"]), entry["structure"]), entry["max_bits"],
                                   parse_dtype(packed.header["coord_dtype"]))
    module.alq_structure = entry["structure"]
    del module.weight
    module.register_buffer("weight", weight.detach().new_empty(0), persistent=False)
    module.register_forward_pre_hook(_materialise)
    module.register_forward_hook(_release, always_call=True)


class PackedModel(nn.Module):
    """``model`` with its quantized layers in packed form; ``forward`` is the model's forward.

    Build it with :func:`load_packed_for_inference`. ``packed_layers`` maps layer names to their modules.
    Every module sharing a quantized layer's weight is packed with that layer's sections.
    """

    def __init__(self, model: nn.Module, packed: PackedFile) -> None:
        super().__init__()
        modules = check_model(packed.header, model, attached_must_match=False)
        self.model = model
        with torch.no_grad():
            model.load_state_dict(float_tensors_for(packed, float_remainder(model, modules)), strict=False)
        users: dict[int, list[nn.Module]] = {}
        for module in model.modules():
            if isinstance(getattr(module, "weight", None), nn.Parameter):
                users.setdefault(id(module.weight), []).append(module)
        for entry in packed.header["layers"]:
            for user in users[id(modules[entry["name"]].weight)]:
                pack_module(user, packed, entry)
        self.packed_layers = list(modules)
        self.quantized_bytes = int(packed.header["quantized_bytes"])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def packed_bytes(self) -> int:
        """Bytes held by the packed buffers of all quantized layers."""
        modules = dict(self.model.named_modules())
        return sum(getattr(modules[name], f"alq_packed_{key}").numel()
                   for name in self.packed_layers for key in LAYER_SECTIONS)


def load_packed_for_inference(path: str | os.PathLike,
                              model_or_factory: nn.Module | Callable[[], nn.Module]) -> PackedModel:
    """A :class:`PackedModel` in eval mode from the packed file ``path``.

    ``model_or_factory`` is a model of the file's architecture (converted in place) or a callable returning
    one; it may or may not carry multi-bit buffers (they are dropped). The file is verified and the model
    checked against it before anything is changed.
    """
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    return PackedModel(model, read_packed(path)).eval()
