"""All quantized layers of one model, driven together: the object the callbacks act through.

It holds no Lightning state: step counters are plain integers, tensors live in the modules' buffers.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .core import (
    LayerBits,
    QuadraticConfig,
    average_bits,
    basis_step,
    coordinate_step,
    group_importance,
    project_grad,
    quadratic_model,
    select_groups,
    select_slots,
    slot_bits,
    slot_importance,
    ste_step,
    update_stats,
)
from .quantizer import QuantizedLayer


class MultiBitNetwork:
    """The quantized layers of a model and the step counters of their AMSGrad statistics.

    A step updates the layers that received a gradient and leaves the others as they are, so each layer
    counts its own updates: ``weight_steps[name]`` counts weight-domain updates (basis and STE steps),
    ``coord_steps[name]`` coordinate-domain ones; a basis step re-derives the coordinate statistics, so it
    sets the layer's coordinate count to its weight count.
    """

    def __init__(self, layers: Mapping[str, QuantizedLayer], float_layers: Mapping[str, str],
                 config: QuadraticConfig | None = None) -> None:
        self.layers = dict(layers)
        self.float_layers = dict(float_layers)
        self.config = config or QuadraticConfig()
        self.weight_steps = dict.fromkeys(self.layers, 0)
        self.coord_steps = dict.fromkeys(self.layers, 0)
        self.initial_bits = 0.0

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

    def initialize(self) -> None:
        """Structured sketching of every layer from its current float weight."""
        for layer in self.layers.values():
            layer.initialize()
        self.weight_steps = dict.fromkeys(self.layers, 0)
        self.coord_steps = dict.fromkeys(self.layers, 0)
        self.initial_bits = self.avg_bits

    def take_grads(self) -> dict[str, torch.Tensor]:
        """Gradients w.r.t. ŵ in group layout of the layers that have one (maybe none), cleared from the
        weights so that no other optimizer uses them."""
        grads = {name: grad for name, layer in self.layers.items() if (grad := layer.grad_groups()) is not None}
        self.drop_grads()
        return grads

    def drop_grads(self) -> None:
        for layer in self.layers.values():
            layer.param.grad = None

    @staticmethod
    def all_finite(grads: Mapping[str, torch.Tensor]) -> bool:
        return not grads or bool(torch.stack([grad.isfinite().all() for grad in grads.values()]).all())

    def without_stats(self) -> list[str]:
        """Layers that never received a gradient since initialisation (no statistics to rank them by)."""
        return [name for name, steps in self.coord_steps.items() if steps == 0]

    def write_weights(self, names: Iterable[str] | None = None) -> None:
        for name in self.layers if names is None else names:
            self.layers[name].write_weight()

    def basis_step(self, grads: Mapping[str, torch.Tensor], lr: float) -> None:
        for name, grad in grads.items():
            layer = self.layers[name]
            self.weight_steps[name] += 1
            basis_step(layer.state, layer.weight_stats, layer.coord_stats, grad, self.weight_steps[name], lr,
                       self.config)
            self.coord_steps[name] = self.weight_steps[name]
        self.write_weights(grads)

    def coordinate_step(self, grads: Mapping[str, torch.Tensor], lr: float) -> None:
        for name, grad in grads.items():
            layer = self.layers[name]
            self.coord_steps[name] += 1
            coordinate_step(layer.state, layer.coord_stats, grad, self.coord_steps[name], lr, self.config)
        self.write_weights(grads)

    def start_ste(self) -> None:
        """Latent float weights start at ŵ."""
        for layer in self.layers.values():
            layer.hold_latent(layer.state.reconstruct())

    def end_ste(self) -> None:
        """Drop the latent weights (4 bytes per weight) once STE is over."""
        for layer in self.layers.values():
            layer.hold_latent(None)

    def ste_step(self, grads: Mapping[str, torch.Tensor], lr: float) -> None:
        for name, grad in grads.items():
            layer = self.layers[name]
            self.weight_steps[name] += 1
            ste_step(layer.state, layer.buffer("latent"), layer.weight_stats, layer.coord_stats, grad,
                     self.weight_steps[name], lr, self.config)
            self.coord_steps[name] = self.weight_steps[name]
        self.write_weights(grads)

    def observe(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Fold the coordinate gradients into the coordinate statistics without stepping."""
        for name, grad in grads.items():
            layer = self.layers[name]
            self.coord_steps[name] += 1
            update_stats(layer.coord_stats, project_grad(layer.state, grad), self.config)

    def _models(self, lr: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Quadratic models of the layers that have statistics."""
        return {name: quadratic_model(layer.coord_stats, self.coord_steps[name], lr, self.config)
                for name, layer in self.layers.items() if self.coord_steps[name] > 0}

    def prune_slots(self, bits_to_remove: float, lr: float, per_bit: bool = False) -> int:
        """Clear the least important live slots worth at least ``bits_to_remove`` bits; returns bits removed.

        Only layers with statistics take part (see :meth:`without_stats`).
        """
        models = self._models(lr)
        importance = {name: slot_importance(self.layers[name].state, *model) for name, model in models.items()}
        sizes = {name: self.layers[name].layout.group_size for name in models}
        return self.clear_slots(select_slots(importance, sizes, bits_to_remove, per_bit))

    def prune_groups(self, bits_to_remove: float, lr: float) -> int:
        """Clear whole groups, least loss increase per bit first; returns bits removed (layers as above)."""
        models = self._models(lr)
        importance = {name: group_importance(self.layers[name].state, *model) for name, model in models.items()}
        live_bits = {name: self.layers[name].state.bits_per_group() * self.layers[name].layout.group_size
                     for name in models}
        chosen = select_groups(importance, live_bits, bits_to_remove)
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
        return {name: {**{key: t.detach().cpu().clone() for key, t in layer.multibit_tensors().items()},
                       "steps": torch.tensor([self.weight_steps[name], self.coord_steps[name]])}
                for name, layer in self.layers.items()}

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
            if "steps" in tensors[name]:
                self.weight_steps[name], self.coord_steps[name] = map(int, tensors[name]["steps"].tolist())
        self.write_weights()

    def scalars(self) -> dict[str, float]:
        return {"initial_bits": self.initial_bits}

    def load_scalars(self, scalars: Mapping[str, float]) -> None:
        """Inverse of :meth:`scalars`; the single ``weight_step``/``coord_step`` of older checkpoints apply to
        every layer."""
        self.initial_bits = float(scalars["initial_bits"])
        if "weight_step" in scalars:
            self.weight_steps = dict.fromkeys(self.layers, int(scalars["weight_step"]))
            self.coord_steps = dict.fromkeys(self.layers, int(scalars["coord_step"]))
