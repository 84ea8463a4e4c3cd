"""All quantized layers of one model, driven together: the object the callbacks act through.

It holds no Lightning state: tensors live in the modules' buffers (views of the buckets' tensors), step counters
per group on the device.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .buckets import BoundBucket, bind
from .core import (
    LayerBits,
    QuadraticConfig,
    auto_layout,
    average_bits,
    group_importance,
    quadratic_model,
    select_groups,
    select_slots,
    slot_bits,
    slot_importance,
)
from .core.bucket import coordinate_step, observe, weight_domain_step
from .core.prune import select_layers
from .layers import QuantizedLayer

STEPS: dict[str, Callable] = {
    "basis": lambda bucket, grad, update, lr, config, block, out: weight_domain_step(
        bucket, grad, update, lr, config, ste=False, block=block, out=out),
    "ste": lambda bucket, grad, update, lr, config, block, out: weight_domain_step(
        bucket, grad, update, lr, config, ste=True, block=block, out=out),
    "coordinate": lambda bucket, grad, update, lr, config, block, out: coordinate_step(
        bucket, grad, update, lr, config, block=block, out=out),
    "observe": lambda bucket, grad, update, lr, config, block, out: observe(bucket, grad, update, config, block=block),
}
"""The bucket steps by kind, with one signature ``(bucket, grad, update, lr, config, block, out)``: ``out`` takes
the new ŵ (``observe`` leaves ŵ as it is)."""


class MultiBitNetwork:
    """The quantized layers of a model, bound to flat buckets, and the step counters of their statistics.

    A step updates the layers that received a gradient and leaves the others as they are, so each layer
    counts its own updates: ``weight_steps[name]`` counts weight-domain updates (basis and STE steps),
    ``coord_steps[name]`` coordinate-domain ones; a basis step re-derives the coordinate statistics, so it
    sets the layer's coordinate count to its weight count. A step whose gradients are not all finite is
    skipped as a whole, decided on the device (:attr:`skipped` counts them): a step never waits for the
    device. Layers sharing ``max_bits`` share a bucket (:mod:`alq_lightning.buckets`), so a step launches
    the same kernels whatever the number of layers. With ``compile`` each bucket's step runs through
    ``torch.compile`` (on CUDA replayed as a CUDA graph); it equals the eager step up to float rounding.
    """

    def __init__(self, layers: Mapping[str, QuantizedLayer], float_layers: Mapping[str, str],
                 config: QuadraticConfig | None = None, compile: bool = False) -> None:
        self.layers = dict(layers)
        self.float_layers = dict(float_layers)
        self.config = config or QuadraticConfig()
        self.compile = compile
        self._compiled_steps: dict[tuple[str, bool], Callable] = {}
        self.initial_bits = 0.0
        self.buckets: list[BoundBucket] = []
        self._steps = dict.fromkeys(self.layers, (0, 0))
        self._skipped: torch.Tensor | None = None

    def belongs_to(self, model: nn.Module) -> bool:
        """Whether every quantized layer is a module of ``model``."""
        modules = {id(module) for module in model.modules()}
        return all(id(layer.module) in modules for layer in self.layers.values())

    @property
    def numel(self) -> int:
        return sum(layer.layout.numel for layer in self.layers.values())

    def layer_bits(self) -> dict[str, LayerBits]:
        return {name: layer.bits for name, layer in self.layers.items()}

    @property
    def avg_bits(self) -> float:
        return average_bits(list(self.layer_bits().values()))

    @property
    def binary_bits(self) -> int:
        return sum(bits.binary_bits for bits in self.layer_bits().values())

    def bound(self) -> list[BoundBucket]:
        """The buckets, bound afresh (from the current buffers and counters) when a layer's views broke."""
        if not self.buckets or not all(bucket.is_bound() for bucket in self.buckets):
            self._steps = self.steps()
            grads = {name: grad for bucket in self.buckets for name, grad in bucket.grad_groups().items()}
            self.buckets = bind(self.layers.values(), self._steps)
            for bucket in self.buckets:
                bucket.load(grads)
        return self.buckets

    def steps(self) -> dict[str, tuple[int, int]]:
        """Per layer ``(weight steps, coordinate steps)``; reads the device."""
        steps = dict(self._steps)
        for bucket in self.buckets:
            steps.update(bucket.steps())
        return steps

    @property
    def weight_steps(self) -> dict[str, int]:
        return {name: pair[0] for name, pair in self.steps().items()}

    @property
    def coord_steps(self) -> dict[str, int]:
        return {name: pair[1] for name, pair in self.steps().items()}

    def set_steps(self, steps: Mapping[str, tuple[int, int]]) -> None:
        self._steps.update(steps)
        for bucket in self.buckets:
            bucket.set_steps(steps)

    @property
    def skipped(self) -> int:
        """Steps skipped for non-finite gradients since the last :meth:`reset_skipped`; reads the device."""
        return 0 if self._skipped is None else int(self._skipped)

    def reset_skipped(self) -> None:
        self._skipped = None

    def initialize(self) -> None:
        """Structured sketching of every layer from its current float weight."""
        for layer in self.layers.values():
            layer.initialize()
        self.set_steps(dict.fromkeys(self.layers, (0, 0)))
        self.initial_bits = self.avg_bits

    def take_grads(self) -> frozenset[str]:
        """Gather the gradients w.r.t. ŵ into the buckets and clear them from the weights (so that no other
        optimizer uses them); returns the layers that had one (maybe none)."""
        return frozenset().union(*(bucket.gather() for bucket in self.bound()))

    def load_grads(self, grads: Mapping[str, torch.Tensor]) -> frozenset[str]:
        """Put ``{layer: [G, n] gradient}`` into the buckets as :meth:`take_grads` would; returns the layers."""
        return frozenset().union(*(bucket.load(grads) for bucket in self.bound()))

    def drop_grads(self) -> None:
        for layer in self.layers.values():
            layer.param.grad = None

    def without_stats(self) -> list[str]:
        """Layers that never received a gradient since initialisation (no statistics to rank them by)."""
        return [name for name, steps in self.coord_steps.items() if steps == 0]

    def write_weights(self, names: Iterable[str] | None = None) -> None:
        for name in self.layers if names is None else names:
            self.layers[name].write_weight()

    def _updates(self, names: frozenset[str]) -> list[torch.Tensor]:
        """Per bucket ``[G]`` bool: the groups of ``names``, none if any gathered gradient is not finite."""
        buckets = self.bound()
        finite = [bucket.grad.abs().amax() < torch.inf for bucket in buckets]  # nan propagates: not finite
        finite = finite[0] if len(finite) == 1 else torch.stack(finite).all()
        skipped = (~finite).long()
        self._skipped = skipped if self._skipped is None else self._skipped.add_(skipped)
        return [bucket.update_mask(names) & finite for bucket in buckets]

    def _step(self, kind: str, names: frozenset[str], lr: float = 0.0) -> None:
        """Run step ``kind`` of :data:`STEPS` on every bucket; write ŵ unless it only observes."""
        for bucket, update in zip(self.bound(), self._updates(names)):
            out = None if kind == "observe" else bucket.weight
            if self.compile:
                self._compiled(kind, bucket)(bucket.bucket, bucket.grad, update, bucket.lr.fill_(lr), self.config,
                                             None, out)
            else:
                STEPS[kind](bucket.bucket, bucket.grad, update, lr, self.config, bucket.block, out)
            if out is not None:
                bucket.write_weights(names)

    def _compiled(self, kind: str, bucket: BoundBucket) -> Callable:
        """``torch.compile`` of step ``kind`` for ``bucket``'s device: one block, the learning rate as a tensor; on
        CUDA in ``reduce-overhead`` mode (a CUDA graph replayed every step, the state at static addresses)."""
        cuda = bucket.grad.is_cuda
        if (kind, cuda) not in self._compiled_steps:
            self._compiled_steps[kind, cuda] = torch.compile(
                STEPS[kind], fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else None)
        if cuda:
            bucket.mark_static()
        return self._compiled_steps[kind, cuda]

    def basis_step(self, names: frozenset[str], lr: float) -> None:
        """Basis step of the layers ``names`` with the gradients in the buckets (:meth:`take_grads`)."""
        self._step("basis", names, lr)

    def ste_step(self, names: frozenset[str], lr: float) -> None:
        """Straight-through step (latent weights, see :meth:`start_ste`) of the layers ``names``."""
        self._step("ste", names, lr)

    def coordinate_step(self, names: frozenset[str], lr: float) -> None:
        """Coordinate step of the layers ``names``."""
        self._step("coordinate", names, lr)

    def observe(self, names: frozenset[str]) -> None:
        """Fold the coordinate gradients of the layers ``names`` into their statistics without stepping."""
        self._step("observe", names)

    def start_ste(self) -> None:
        """Latent float weights start at ŵ."""
        for layer in self.layers.values():
            layer.hold_latent(layer.state.reconstruct())

    def end_ste(self) -> None:
        """Drop the latent weights (4 bytes per weight) once STE is over."""
        for layer in self.layers.values():
            layer.hold_latent(None)

    def _models(self, lr: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Quadratic models of the layers that have statistics."""
        steps = self.coord_steps
        return {name: quadratic_model(layer.coord_stats, steps[name], lr, self.config)
                for name, layer in self.layers.items() if steps[name] > 0}

    def _select(self, scores: Mapping[str, torch.Tensor], bits: Mapping[str, torch.Tensor],
                bits_to_remove: float) -> dict[str, torch.Tensor]:
        """The budgeted choice over ``{layer: tensor}`` scores (:func:`~alq_lightning.core.prune.select_layers`)."""
        return select_layers(scores, bits, bits_to_remove)

    def prune_slots(self, bits_to_remove: float, lr: float, per_bit: bool = False) -> int:
        """Clear the least important live slots worth at least ``bits_to_remove`` bits; returns bits removed.

        Only layers with statistics take part (see :meth:`without_stats`).
        """
        models = self._models(lr)
        importance = {name: slot_importance(self.layers[name].state, *model) for name, model in models.items()}
        sizes = {name: self.layers[name].layout.group_size for name in models}
        return self.clear_slots(select_slots(importance, sizes, bits_to_remove, per_bit, select=self._select))

    def prune_groups(self, bits_to_remove: float, lr: float) -> int:
        """Clear whole groups, least loss increase per bit first; returns bits removed (layers as above)."""
        models = self._models(lr)
        importance = {name: group_importance(self.layers[name].state, *model) for name, model in models.items()}
        live_bits = {name: self.layers[name].state.bits_per_group() * self.layers[name].layout.group_size
                     for name in models}
        chosen = select_groups(importance, live_bits, bits_to_remove, select=self._select)
        return self.clear_slots({name: groups[:, None] & self.layers[name].state.mask
                                 for name, groups in chosen.items()})

    def clear_slots(self, chosen: Mapping[str, torch.Tensor]) -> int:
        """Prune the ``{layer: [G, K] bool}`` slots (canonical dead form: α = 0, β = +1); returns bits removed."""
        before = self.binary_bits
        for name, slots in chosen.items():
            state = self.layers[name].state
            state.mask.masked_fill_(slots, False)
            state.coords.masked_fill_(slots, 0)
            state.codes.bitwise_or_(slot_bits(slots).to(torch.uint8)[:, None])
        self.write_weights(chosen)
        return before - self.binary_bits

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{layer: {buffer: tensor, "steps": [weight steps, coordinate steps]}}`` on CPU, for a checkpoint."""
        steps = self.steps()
        return {name: {**{key: t.detach().cpu().clone() for key, t in layer.multibit_tensors().items()},
                       "steps": torch.tensor(steps[name])}
                for name, layer in self.layers.items()}

    def structures(self) -> dict[str, str]:
        """``{layer: structure}`` (``GroupLayout.describe``), saved beside :meth:`state_tensors`."""
        return {name: layer.layout.describe() for name, layer in self.layers.items()}

    def check_structures(self, structures: Mapping[str, str]) -> None:
        """Refuse saved ``{layer: structure}`` that cut a layer into other groups than this network does (tensors of
        one shape can hold differently laid-out groups: ``kernelwise`` and ``pixelwise`` of a 3×3 Conv with 9
        input channels, or ``subchannelwise(1)`` and ``columnwise(1)`` of a square Linear)."""
        for name, structure in structures.items():
            layer = self.layers.get(name)
            if layer is not None and not layer.layout.same_groups(auto_layout(layer.layout.shape, structure)):
                raise ValueError(f"checkpoint layer {name!r} was quantized as {structure}, the model's is "
                                 f"{layer.layout.describe()}: its groups would be read in another order. Attach it "
                                 f"with structures={{{name!r}: {structure!r}}}")

    def load_state_tensors(self, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Inverse of :meth:`state_tensors`; refuses missing layers or mismatching shapes before writing.

        Checkpoints written before the step counters were kept per layer have no ``"steps"``; their
        counters come with the callback state (:meth:`load_scalars`).
        """
        if set(tensors) != set(self.layers):
            raise ValueError(f"checkpoint has multi-bit layers {sorted(tensors)}, the model has {sorted(self.layers)}")
        for name, layer in self.layers.items():
            for key, target in layer.multibit_tensors().items():
                source = tensors[name].get(key)
                shapes = {tuple(target.shape)}
                if key == "latent":
                    shapes = {(0, layer.layout.group_size), (layer.layout.num_groups, layer.layout.group_size)}
                if source is None or tuple(source.shape) not in shapes:
                    found = None if source is None else tuple(source.shape)
                    raise ValueError(f"checkpoint tensor {name}.{key} is {found}, the model expects "
                                     f"{' or '.join(map(str, sorted(shapes)))}")
        for name, layer in self.layers.items():
            for key, target in layer.multibit_tensors().items():
                if key != "latent":
                    target.copy_(tensors[name][key])
            latent = tensors[name]["latent"]
            layer.hold_latent(latent if latent.numel() else None)
        self.set_steps({name: tuple(map(int, tensors[name]["steps"].tolist()))
                        for name in self.layers if "steps" in tensors[name]})
        self.write_weights()

    def scalars(self) -> dict[str, float]:
        return {"initial_bits": self.initial_bits}

    def load_scalars(self, scalars: Mapping[str, float]) -> None:
        """Inverse of :meth:`scalars`; the single ``weight_step``/``coord_step`` of older checkpoints apply to
        every layer."""
        self.initial_bits = float(scalars["initial_bits"])
        if "weight_step" in scalars:
            self.set_steps(dict.fromkeys(self.layers, (int(scalars["weight_step"]), int(scalars["coord_step"]))))
