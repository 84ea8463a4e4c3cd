"""Select the weight parameters of any ``nn.Module`` and attach multi-bit state to them.

A *layer* is one quantized weight parameter: every floating-point parameter with at least two dimensions
is a candidate (Linear and Conv weights, ``nn.MultiheadAttention``'s ``in_proj_weight`` and
``q/k/v_proj_weight``, embedding tables, ``nn.Bilinear``, raw Parameters of custom modules); biases,
normalisation parameters and other 1-D parameters stay float. A layer is named after its module when the
parameter is that module's ``weight`` (``"fc1"``) and after the parameter otherwise
(``"encoder.layers.0.self_attn.in_proj_weight"``).

The module keeps its dense Parameter, which always holds the reconstruction ŵ, so the model's own forward
runs unchanged; it gains non-persistent buffers (they follow ``.to()`` but stay out of ``state_dict``, so a
plain ``load_state_dict`` of a quantized checkpoint needs nothing from this package), named
``alq_<key>`` for its ``weight`` and ``alq_<parameter>_<key>`` for another parameter::

    codes [G, n] uint8 (packed bases)      coords [G, K]      mask [G, K] bool
    weight_m/v/vmax [G, n]    coord_m/v/vmax [G, K]      latent [G, n] during STE, [0, n] otherwise

The float buffers hold float32 (float64 for a float64 weight) whatever the model's precision: they are
registered as int32 (int64) tensors of the same bytes and read through a float view, because
``module.to(dtype)`` — which ``precision="bf16-true"`` and ``"16-true"`` apply to the whole model — casts
floating buffers but leaves integer ones alone. ALQ's statistics and coordinates would not survive bf16.

A Parameter shared by several modules is quantized once, on the first selected name that holds it (one
selected user is enough, one explicitly left in float is an error); writing ŵ into it updates every module
that uses it.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .core import AmsgradStats, GroupLayout, LayerBits, MultiBitState, auto_layout, check_max_bits, greedy_init

BUFFER_KEYS = ("codes", "coords", "mask", "weight_m", "weight_v", "weight_vmax",
            "coord_m", "coord_v", "coord_vmax", "latent")
_FLOATBUFFER_KEYS = frozenset(BUFFER_KEYS) - {"codes", "mask"}
_STORAGE = {torch.float32: torch.int32, torch.float64: torch.int64}
_VIEWED_AS = {storage: dtype for dtype, storage in _STORAGE.items()}
SHARDS = "_alq_shards"  # on a module of a sharded model: {parameter name: its sharded layer}
_EXPLICIT = ("matched by exclude", "first layer kept in float", "last layer kept in float")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or the local shard of a ``DTensor`` (a view of it, outside autograd)."""
    if isinstance(tensor, DTensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


def layer_name(module_name: str, attr: str) -> str:
    """``("fc1", "weight")`` -> ``"fc1"``; ``("attn", "in_proj_weight")`` -> ``"attn.in_proj_weight"``."""
    if attr == "weight":
        return module_name
    return f"{module_name}.{attr}" if module_name else attr


def buffer_prefix(attr: str) -> str:
    """Prefix of the multi-bit buffers of parameter ``attr`` on its module."""
    return "alq_" if attr == "weight" else f"alq_{attr}_"


def default_kind(module: nn.Module, attr: str) -> str:
    """The automatic layout kind of parameter ``attr`` of ``module`` (see :func:`~alq_lightning.core.auto_layout`):
    ``"conv"`` for Conv weights, ``"columns"`` for ``(in, out)`` weights used as ``x @ W`` (Hugging Face's
    ``Conv1D``), ``"rows"`` for everything else."""
    if attr == "weight" and isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    transposed = type(module).__name__ == "Conv1D" and getattr(module, "nf", None) == module.weight.shape[-1]
    if attr == "weight" and transposed:
        return "columns"
    return "rows"


@dataclass
class QuantizedLayer:
    """One quantized parameter ``attr`` of ``module`` (named ``module_name``): its layout and views of its
    multi-bit buffers."""

    name: str
    module: nn.Module
    layout: GroupLayout
    attr: str = "weight"
    module_name: str = ""

    @property
    def param(self) -> nn.Parameter:
        """The dense parameter, holding ŵ."""
        return getattr(self.module, self.attr)

    def buffer_name(self, key: str) -> str:
        return buffer_prefix(self.attr) + key

    def stored(self, key: str) -> torch.Tensor:
        """The multi-bit tensor ``key`` as stored (float ones in their integer storage): a module buffer."""
        return self.module._buffers.get(self.buffer_name(key))

    def store(self, key: str, tensor: torch.Tensor) -> None:
        """Hold ``tensor`` (in its storage dtype) as the multi-bit tensor ``key``: a non-persistent module buffer."""
        self.module.register_buffer(self.buffer_name(key), tensor, persistent=False)

    def buffer(self, key: str) -> torch.Tensor:
        """The multi-bit tensor ``key``; float ones as a float view of their integer storage."""
        stored = self.stored(key)
        return stored.view(_VIEWED_AS[stored.dtype]) if key in _FLOATBUFFER_KEYS else stored

    def local_param(self) -> torch.Tensor:
        """The part of the parameter this process holds: the whole of it, or a sharded one's local shard (a view
        that writes into the shard)."""
        return local(self.param)

    def local_grad(self) -> torch.Tensor | None:
        """The gradient of :meth:`local_param`, or None."""
        grad = self.param.grad
        return None if grad is None else local(grad)

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
        """``[G, n]`` gradient of the parameter in group layout (float32 at least), or None."""
        grad = self.local_grad()
        return None if grad is None else self.layout.to_groups(grad.to(self.buffer("coords").dtype))

    def weight_groups(self) -> torch.Tensor:
        return self.layout.to_groups(self.local_param().detach().to(self.buffer("coords").dtype))

    def initialize(self) -> None:
        """Structured sketching of the current float weight (see :meth:`load_state`)."""
        self.load_state(greedy_init(self.weight_groups(), self.state.max_bits))

    def load_state(self, state: MultiBitState) -> None:
        """Copy ``state`` into the buffers, zero statistics, drop latent weights, write ŵ into the weight."""
        current = self.state
        for target, source in zip((current.codes, current.coords, current.mask),
                                  (state.codes, state.coords, state.mask)):
            target.copy_(source)
        for stats in (self.weight_stats, self.coord_stats):
            stats.reset()
        self.hold_latent(None)
        self.write_weight()

    def hold_latent(self, latent: torch.Tensor | None) -> None:
        """Hold a copy of ``latent [G, n]`` as the latent weights, or none (``[0, n]``): STE alone needs them,
        so the other stages do without their 4 bytes per weight."""
        coords = self.buffer("coords")
        if latent is None and self.buffer("latent").numel() == 0:
            return  # none held already: the buffer (maybe a view bound elsewhere) stays
        rows = 0 if latent is None else self.layout.num_groups
        stored = torch.zeros(rows, self.layout.group_size, dtype=coords.dtype, device=coords.device)
        if latent is not None:
            stored.copy_(latent)
        self.store("latent", stored.view(_STORAGE[coords.dtype]))

    def write_weight(self) -> None:
        """Copy the reconstruction ŵ into the dense parameter."""
        param = self.local_param()
        with torch.no_grad():
            param.copy_(self.layout.from_groups(self.state.reconstruct()).to(param.dtype))

    def multibit_tensors(self) -> dict[str, torch.Tensor]:
        return {key: self.buffer(key) for key in BUFFER_KEYS}


@dataclass(frozen=True)
class Candidate:
    """A floating-point parameter with at least two dimensions: ``module.<attr>``, named ``name``."""

    name: str
    module_name: str
    module: nn.Module
    attr: str

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    @property
    def full_name(self) -> str:
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr

    def matches(self, pattern: str) -> bool:
        """Whether ``pattern`` matches the layer name or the parameter's fully qualified name."""
        return fnmatch.fnmatchcase(self.name, pattern) or fnmatch.fnmatchcase(self.full_name, pattern)


def candidates(model: nn.Module) -> Iterator[Candidate]:
    """Every floating-point parameter of ``model`` with at least two dimensions, under each name it has."""
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dim() >= 2:
                yield Candidate(layer_name(module_name, attr), module_name, module, attr)


@dataclass
class LayerSelection:
    """Which weight parameters get quantized, and how.

    Args:
        max_bits: slots per group, 1..8.
        include / exclude: ``fnmatch`` patterns over layer names (``"fc*"``, ``"encoder.*.in_proj_weight"``)
            or fully qualified parameter names (``"*.weight"``); a candidate is quantized if it matches some
            ``include`` pattern and no ``exclude`` pattern. A frozen parameter (``requires_grad=False``)
            stays in float unless ``include`` names its layer exactly.
        types: module class names (``"Linear"``, ``"Embedding"``, ``"MultiheadAttention"``, ...) whose
            parameters may be quantized; None for every module.
        structures: ``{pattern: structure}`` overrides (first match wins); other layers use the automatic
            layout of their kind (:func:`default_kind`).
        max_bits_overrides: ``{pattern: max_bits}`` overrides (first match wins).
        keep_first / keep_last: leave the first / last candidate (registration order) in float.
    """

    max_bits: int = 6
    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    types: Sequence[str] | None = None
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

    def select(self, model: nn.Module) -> tuple[dict[str, tuple[Candidate, GroupLayout, int]], dict[str, str]]:
        """``({layer: (candidate, layout, max_bits)}, {float layer: reason})`` for ``model``.

        Raises ValueError when a pattern or type matches no candidate or nothing is left to quantize.
        """
        found = list(candidates(model))
        names = [c.name for c in found]
        if not found:
            raise ValueError(f"no weight to quantize in {type(model).__name__}: it has no floating-point parameter "
                             f"with two or more dimensions")
        for argument, patterns in (("include", self.include), ("exclude", self.exclude),
                                   ("structures", self.structures), ("max_bits_overrides", self.max_bits_overrides)):
            for pattern in patterns:
                if not any(c.matches(pattern) for c in found):
                    raise ValueError(f"{argument} pattern {pattern!r} matches no weight parameter; layers are: {names}")
        present = sorted({type(c.module).__name__ for c in found})
        unknown = [name for name in self.types or () if name not in present]
        if unknown:
            raise ValueError(f"types={list(self.types)} has {unknown}, which hold no weight parameter here; "
                             f"module types holding one: {present}")
        reasons = {c.name: self._float_reason(c, index, len(found)) for index, c in enumerate(found)}
        owners: dict[int, str] = {}
        for c in found:
            if not reasons[c.name]:
                owners.setdefault(id(c.param), c.name)
        chosen, left_float = {}, {}
        for c in found:
            owner = owners.get(id(c.param), c.name)
            if owner != c.name:
                if reasons[c.name] in _EXPLICIT:
                    raise ValueError(f"layers {owner!r} and {c.name!r} share one weight Parameter, but {c.name!r} is "
                                     f"{reasons[c.name]} while {owner!r} is selected: select both or neither")
                left_float[c.name] = f"shares its weight with {owner!r}, quantized there"
            elif reasons[c.name]:
                left_float[c.name] = reasons[c.name]
            else:
                try:
                    layout = auto_layout(c.param.shape, _first_match(self.structures, c),
                                         default_kind(c.module, c.attr))
                except ValueError as error:
                    raise ValueError(f"layer {c.name!r}: {error}") from None
                chosen[c.name] = (c, layout, _first_match(self.max_bits_overrides, c) or self.max_bits)
        if not chosen:
            raise ValueError(f"no layer to quantize in {type(model).__name__}: candidates {names} were all left in "
                             f"float ({left_float})")
        return chosen, left_float

    def _float_reason(self, candidate: Candidate, index: int, count: int) -> str:
        kind = type(candidate.module).__name__
        if self.types is not None and kind not in self.types:
            return f"type {kind} not in types"
        if not any(candidate.matches(p) for p in self.include):
            return "not matched by include"
        if any(candidate.matches(p) for p in self.exclude):
            return "matched by exclude"
        if self.keep_first and index == 0:
            return "first layer kept in float"
        if self.keep_last and index == count - 1:
            return "last layer kept in float"
        if not candidate.param.requires_grad and candidate.name not in self.include:
            return "frozen (requires_grad=False); name it in include to quantize it"
        return ""


def _first_match(overrides: Mapping[str, object], candidate: Candidate):
    return next((value for pattern, value in overrides.items() if candidate.matches(pattern)), None)


def zeroed_tensors(layout: GroupLayout, max_bits: int, dtype: torch.dtype,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Fresh multi-bit tensors of ``layout`` as stored (:data:`BUFFER_KEYS`): codes all ones (``[G, n]`` uint8),
    the rest zero, float ones in the integer storage of float64 for a float64 ``dtype``, of float32 otherwise."""
    storage = _STORAGE[torch.float64 if dtype == torch.float64 else torch.float32]
    shapes = dict.fromkeys(("codes", "weight_m", "weight_v", "weight_vmax"), (layout.num_groups, layout.group_size))
    shapes["latent"] = (0, layout.group_size)
    shapes.update(dict.fromkeys(("coords", "mask", "coord_m", "coord_v", "coord_vmax"), (layout.num_groups, max_bits)))
    return {key: torch.full(shapes[key], 2**max_bits - 1 if key == "codes" else 0,
                            dtype={"codes": torch.uint8, "mask": torch.bool}.get(key, storage), device=device)
            for key in BUFFER_KEYS}


def attach(model: nn.Module, selection: LayerSelection) -> tuple[dict[str, QuantizedLayer], dict[str, str]]:
    """Register zeroed multi-bit buffers on the selected parameters (idempotent); return the layers and the
    float candidates with the reason each stays float.

    The state is float64 for a float64 weight, float32 for every other dtype.
    """
    chosen, left_float = selection.select(model)
    layers = {}
    for name, (candidate, layout, max_bits) in chosen.items():
        module, param = candidate.module, candidate.param
        layer = QuantizedLayer(name, module, layout, candidate.attr, candidate.module_name)
        for key, fresh in zeroed_tensors(layout, max_bits, param.dtype, param.device).items():
            existing = getattr(module, layer.buffer_name(key), None)
            if existing is not None and existing.shape == fresh.shape and existing.dtype == fresh.dtype:
                continue
            layer.store(key, fresh)
        setattr(module, layer.buffer_name("structure"), layout.describe())
        layers[name] = layer
    return layers, left_float


def find_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """Every parameter of ``model`` that carries multi-bit state, by layer name, in registration order."""
    layers = {}
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            structure = getattr(module, buffer_prefix(attr) + "structure", None)
            if isinstance(getattr(module, buffer_prefix(attr) + "mask", None), torch.Tensor) and structure:
                name = layer_name(module_name, attr)
                layers[name] = QuantizedLayer(name, module, auto_layout(param.shape, structure), attr, module_name)
    return layers


def sharded_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """The sharded layers (:class:`~alq_lightning.sharded.ShardedLayer`) attached to the parameters of a model sharded
    by FSDP2, by layer name within ``model``, in registration order (none for another model)."""
    layers = {}
    for module_name, module in model.named_modules():
        shards = module.__dict__.get(SHARDS, {})
        for attr, _ in module.named_parameters(recurse=False):
            if attr in shards:
                layers[layer_name(module_name, attr)] = shards[attr]
    return layers


def first_non_finite(model: nn.Module) -> str | None:
    """``"parameter '<name>'"`` or ``"coordinates of layer '<name>'"``: the first floating-point parameter of
    ``model`` (a quantized weight holds ŵ) or multi-bit coordinates holding a value that is not finite; None when
    all are finite. Reads the device once; on a model sharded by FSDP2, a collective with the same answer on every
    process."""
    params = dict(model.named_parameters())
    tensors = {f"parameter {name!r}": local(param.detach()) for name, param in params.items()
               if param.is_floating_point()}
    layers = find_layers(model) or sharded_layers(model)
    tensors |= {f"coordinates of layer {name!r}": layer.state.coords for name, layer in layers.items()}
    if not tensors:
        return None
    flags = [tensor.isfinite().all() for tensor in tensors.values()]
    finite = torch.stack([flag.to(flags[0].device) for flag in flags])
    if any(isinstance(param, DTensor) for param in params.values()):  # sharded: finite on every process
        finite = finite.long()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    finite = finite.tolist()
    return next((name for name, ok in zip(tensors, finite) if not ok), None)


def resolve(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """``(module, attr)`` of the parameter that layer ``name`` of ``model`` names, or None."""
    modules = dict(model.named_modules())
    if isinstance(getattr(modules.get(name), "weight", None), nn.Parameter):
        return modules[name], "weight"
    module_name, _, attr = name.rpartition(".")
    module = modules.get(module_name)
    if attr != "weight" and module is not None and isinstance(getattr(module, attr, None), nn.Parameter):
        return module, attr
    return None


def float_remainder(model: nn.Module, layer_names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Every ``state_dict`` tensor of ``model`` except the parameters of the quantized ``layer_names`` and
    the other names of those same Parameters (a weight shared by several modules counts once, as its layer)."""
    quantized = set()
    for name in layer_names:
        module, attr = resolve(model, name)
        quantized.add(id(getattr(module, attr)))
    remainder = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in quantized:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; it cannot be packed")
        remainder[key] = value.detach()
    return remainder
