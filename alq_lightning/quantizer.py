"""Attach multi-bit state to the Linear/Conv layers of any ``nn.Module``.

Each quantized module keeps its dense ``weight`` Parameter, which always holds the reconstruction ŵ, and
gains non-persistent buffers (they follow ``.to()`` but stay out of ``state_dict``, so a plain
``load_state_dict`` of a quantized checkpoint needs nothing from this package)::

    alq_codes [G, n] uint8 (packed bases)      alq_coords [G, K]      alq_mask [G, K] bool
    alq_weight_m/v/vmax [G, n]    alq_coord_m/v/vmax [G, K]      alq_latent [G, n]

The float buffers hold float32 (float64 for a float64 weight) whatever the model's precision: they are
registered as int32 (int64) tensors of the same bytes and read through a float view, because
``module.to(dtype)`` — which ``precision="bf16-true"`` and ``"16-true"`` apply to the whole model — casts
floating buffers but leaves integer ones alone. ALQ's statistics and coordinates would not survive bf16.

A Parameter shared by several modules is quantized once, on the first selected module that holds it (one
selected user is enough, one explicitly left in float is an error); writing ŵ into it updates every module
that uses it.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .core import AmsgradStats, GroupLayout, LayerBits, MultiBitState, auto_layout, check_max_bits, greedy_init

QUANTIZABLE_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d,
}
_BUFFERS = ("codes", "coords", "mask", "weight_m", "weight_v", "weight_vmax",
            "coord_m", "coord_v", "coord_vmax", "latent")
_FLOAT_BUFFERS = frozenset(_BUFFERS) - {"codes", "mask"}
_STORAGE = {torch.float32: torch.int32, torch.float64: torch.int64}
_VIEWED_AS = {storage: dtype for dtype, storage in _STORAGE.items()}
_EXPLICIT = ("matched by exclude", "first layer kept in float", "last layer kept in float")


@dataclass
class QuantizedLayer:
    """One quantized module: its layout and views of its multi-bit buffers."""

    name: str
    module: nn.Module
    layout: GroupLayout

    def buffer(self, key: str) -> torch.Tensor:
        """The multi-bit tensor ``key``; float ones as a float view of their integer storage."""
        stored = getattr(self.module, f"alq_{key}")
        return stored.view(_VIEWED_AS[stored.dtype]) if key in _FLOAT_BUFFERS else stored

    @property
    def state(self) -> MultiBitState:
        return MultiBitState(self.buffer("codes"), self.buffer("coords"), self.buffer("mask"))

    @property
    def weight_stats(self) -> AmsgradStats:
        return AmsgradStats(self.buffer("weight_m"), self.buffer("weight_v"), self.buffer("weight_vmax"))

    @property
    def coord_stats(self) -> AmsgradStats:
        return AmsgradStats(self.buffer("coord_m"), self.buffer("coord_v"), self.buffer("coord_vmax"))

    @property
    def bits(self) -> LayerBits:
        return LayerBits.of(self.buffer("mask"), self.layout.group_size)

    def grad_groups(self) -> torch.Tensor | None:
        """``[G, n]`` gradient of the weight in group layout (float32 at least), or None."""
        grad = self.module.weight.grad
        return None if grad is None else self.layout.to_groups(grad.to(self.buffer("coords").dtype))

    def weight_groups(self) -> torch.Tensor:
        return self.layout.to_groups(self.module.weight.detach().to(self.buffer("coords").dtype))

    def initialize(self) -> None:
        """Structured sketching of the current float weight (see :meth:`load_state`)."""
        self.load_state(greedy_init(self.weight_groups(), self.state.max_bits))

    def load_state(self, state: MultiBitState) -> None:
        """Copy ``state`` into the buffers, zero statistics and latent weights, write ŵ into the weight."""
        current = self.state
        for target, source in zip((current.codes, current.coords, current.mask),
                                  (state.codes, state.coords, state.mask)):
            target.copy_(source)
        for stats in (self.weight_stats, self.coord_stats):
            stats.reset()
        self.buffer("latent").zero_()
        self.write_weight()

    def write_weight(self) -> None:
        """Copy the reconstruction ŵ into the module's weight."""
        weight = self.module.weight
        with torch.no_grad():
            weight.copy_(self.layout.from_groups(self.state.reconstruct()).to(weight.dtype))

    def multibit_tensors(self) -> dict[str, torch.Tensor]:
        return {key: self.buffer(key) for key in _BUFFERS}


@dataclass
class LayerSelection:
    """Which layers get quantized, and how.

    Args:
        max_bits: slots per group, 1..8.
        include / exclude: module-name patterns (``fnmatch``); a layer is quantized if it matches some
            ``include`` pattern and no ``exclude`` pattern. A frozen layer (weight ``requires_grad=False``)
            stays in float unless ``include`` names it exactly.
        types: module types to quantize, among ``Linear``, ``Conv1d``, ``Conv2d``, ``Conv3d``.
        structures: ``{pattern: structure}`` overrides (first match wins); other layers use :func:`auto_layout`.
        max_bits_overrides: ``{pattern: max_bits}`` overrides (first match wins).
        keep_first / keep_last: leave the first / last quantizable layer (registration order) in float.
    """

    max_bits: int = 6
    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    types: Sequence[str] = tuple(QUANTIZABLE_TYPES)
    structures: Mapping[str, str] = field(default_factory=dict)
    max_bits_overrides: Mapping[str, int] = field(default_factory=dict)
    keep_first: bool = False
    keep_last: bool = False

    def __post_init__(self) -> None:
        check_max_bits(self.max_bits)
        for pattern, bits in self.max_bits_overrides.items():
            try:
                check_max_bits(bits)
            except ValueError as error:
                raise ValueError(f"max_bits_overrides[{pattern!r}]: {error}") from None
        unknown = [name for name in self.types if name not in QUANTIZABLE_TYPES]
        if unknown:
            raise ValueError(f"types={list(self.types)} has unknown {unknown}; allowed: {list(QUANTIZABLE_TYPES)}")

    def select(self, model: nn.Module) -> tuple[dict[str, tuple[nn.Module, GroupLayout, int]], dict[str, str]]:
        """``({name: (module, layout, max_bits)}, {float layer name: reason})`` for ``model``.

        Raises ValueError when a pattern matches no candidate layer or nothing is left to quantize.
        """
        allowed = tuple(QUANTIZABLE_TYPES[name] for name in self.types)
        candidates = [(name, m) for name, m in model.named_modules()
                      if isinstance(m, tuple(QUANTIZABLE_TYPES.values()))]
        names = [name for name, _ in candidates]
        if not candidates:
            raise ValueError(f"no layer to quantize in {type(model).__name__}: candidates none; "
                             f"quantizable types are {list(QUANTIZABLE_TYPES)}")
        for argument, patterns in (("include", self.include), ("exclude", self.exclude),
                                   ("structures", self.structures), ("max_bits_overrides", self.max_bits_overrides)):
            for pattern in patterns:
                if not fnmatch.filter(names, pattern):
                    raise ValueError(
                        f"{argument} pattern {pattern!r} matches no Linear/Conv layer; layers are: {names}"
                    )
        reasons = {name: self._float_reason(name, module, index, len(candidates), allowed)
                   for index, (name, module) in enumerate(candidates)}
        owners: dict[int, str] = {}
        for name, module in candidates:
            if not reasons[name]:
                owners.setdefault(id(module.weight), name)
        chosen, left_float = {}, {}
        for name, module in candidates:
            owner = owners.get(id(module.weight), name)
            if owner != name:
                if reasons[name] in _EXPLICIT:
                    raise ValueError(f"layers {owner!r} and {name!r} share one weight Parameter, but {name!r} is "
                                     f"{reasons[name]} while {owner!r} is selected: select both or neither")
                left_float[name] = f"shares its weight with {owner!r}, quantized there"
            elif reasons[name]:
                left_float[name] = reasons[name]
            else:
                structure = _first_match(self.structures, name)
                try:
                    layout = auto_layout(module.weight.shape, structure)
                except ValueError as error:
                    raise ValueError(f"layer {name!r}: {error}") from None
                chosen[name] = (module, layout, _first_match(self.max_bits_overrides, name) or self.max_bits)
        if not chosen:
            raise ValueError(
                f"no layer to quantize in {type(model).__name__}: candidates {names or 'none'} were all left in "
                f"float ({left_float}); quantizable types are {list(QUANTIZABLE_TYPES)}"
            )
        return chosen, left_float

    def _float_reason(self, name: str, module: nn.Module, index: int, count: int, allowed: tuple) -> str:
        if not isinstance(module, allowed):
            return f"type {type(module).__name__} not in types"
        if not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return "not matched by include"
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return "matched by exclude"
        if self.keep_first and index == 0:
            return "first layer kept in float"
        if self.keep_last and index == count - 1:
            return "last layer kept in float"
        if not module.weight.requires_grad and name not in self.include:
            return "frozen (requires_grad=False); name it in include to quantize it"
        return ""


def _first_match(overrides: Mapping[str, object], name: str):
    return next((value for pattern, value in overrides.items() if fnmatch.fnmatchcase(name, pattern)), None)


def attach(model: nn.Module, selection: LayerSelection) -> tuple[dict[str, QuantizedLayer], dict[str, str]]:
    """Register zeroed multi-bit buffers on the selected layers (idempotent); return them and the float layers.

    The state is float64 for a float64 weight, float32 for every other dtype.
    """
    chosen, left_float = selection.select(model)
    layers = {}
    for name, (module, layout, max_bits) in chosen.items():
        weight = module.weight
        storage = _STORAGE[torch.float64 if weight.dtype == torch.float64 else torch.float32]
        shapes = dict.fromkeys(("codes", "weight_m", "weight_v", "weight_vmax", "latent"),
                               (layout.num_groups, layout.group_size))
        shapes.update(dict.fromkeys(("coords", "mask", "coord_m", "coord_v", "coord_vmax"),
                                    (layout.num_groups, max_bits)))
        for key in _BUFFERS:
            kind = {"codes": torch.uint8, "mask": torch.bool}.get(key, storage)
            existing = getattr(module, f"alq_{key}", None)
            if existing is not None and tuple(existing.shape) == shapes[key] and existing.dtype == kind:
                continue
            fill = 2**max_bits - 1 if key == "codes" else 0
            module.register_buffer(f"alq_{key}", torch.full(shapes[key], fill, dtype=kind, device=weight.device),
                                   persistent=False)
        module.alq_structure = layout.describe()
        layers[name] = QuantizedLayer(name, module, layout)
    return layers, left_float


def find_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """Every module of ``model`` that carries multi-bit state, by name, in registration order."""
    return {
        name: QuantizedLayer(name, module, auto_layout(module.weight.shape, module.alq_structure))
        for name, module in model.named_modules()
        if isinstance(getattr(module, "alq_mask", None), torch.Tensor)
    }
