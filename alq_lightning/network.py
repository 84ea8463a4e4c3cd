"""All quantized layers of one model, driven together: the object the callbacks act through.

It holds no Lightning state: step counters are plain integers, tensors live in the modules' buffers.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

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

    ``weight_step`` counts weight-domain updates (basis and STE steps), ``coord_step`` coordinate-domain
    ones; a basis step re-derives the coordinate statistics, so it sets ``coord_step = weight_step``.
    """

    def __init__(self, layers: Mapping[str, QuantizedLayer], float_layers: Mapping[str, str],
                 config: QuadraticConfig | None = None) -> None:
        self.layers = dict(layers)
        self.float_layers = dict(float_layers)
        self.config = config or QuadraticConfig()
        self.weight_step = 0
        self.coord_step = 0
        self.initial_bits = 0.0

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
        self.weight_step = self.coord_step = 0
        self.initial_bits = self.avg_bits

    def take_grads(self) -> dict[str, torch.Tensor] | None:
        """Gradients w.r.t. ŵ in group layout, cleared from the weights (so no other optimizer uses them).

        None when some layer has no gradient (e.g. a second optimizer step of the same batch).
        """
        grads = {name: layer.grad_groups() for name, layer in self.layers.items()}
        self.drop_grads()
        return None if any(grad is None for grad in grads.values()) else grads

    def drop_grads(self) -> None:
        for layer in self.layers.values():
            layer.module.weight.grad = None

    @staticmethod
    def all_finite(grads: Mapping[str, torch.Tensor]) -> bool:
        return bool(torch.stack([grad.isfinite().all() for grad in grads.values()]).all())

    def write_weights(self) -> None:
        for layer in self.layers.values():
            layer.write_weight()

    def basis_step(self, grads: Mapping[str, torch.Tensor], lr: float) -> None:
        self.weight_step += 1
        for name, layer in self.layers.items():
            basis_step(layer.state, layer.weight_stats, layer.coord_stats, grads[name], self.weight_step, lr,
                       self.config)
        self.coord_step = self.weight_step
        self.write_weights()

    def coordinate_step(self, grads: Mapping[str, torch.Tensor], lr: float) -> None:
        self.coord_step += 1
        for name, layer in self.layers.items():
            coordinate_step(layer.state, layer.coord_stats, grads[name], self.coord_step, lr, self.config)
        self.write_weights()

    def start_ste(self) -> None:
        """Latent float weights start at ŵ."""
        for layer in self.layers.values():
            layer.buffer("latent").copy_(layer.state.reconstruct())

    def ste_step(self, grads: Mapping[str, torch.Tensor], lr: float) -> None:
        self.weight_step += 1
        for name, layer in self.layers.items():
            ste_step(layer.state, layer.buffer("latent"), layer.weight_stats, layer.coord_stats, grads[name],
                     self.weight_step, lr, self.config)
        self.coord_step = self.weight_step
        self.write_weights()

    def observe(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Fold the coordinate gradients into the coordinate statistics without stepping."""
        self.coord_step += 1
        for name, layer in self.layers.items():
            update_stats(layer.coord_stats, project_grad(layer.state, grads[name]), self.config)

    def _models(self, lr: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self.coord_step < 1:
            raise RuntimeError("pruning needs coordinate statistics: fold at least one gradient in first")
        return {name: quadratic_model(layer.coord_stats, self.coord_step, lr, self.config)
                for name, layer in self.layers.items()}

    def prune_slots(self, bits_to_remove: float, lr: float, per_bit: bool = False) -> int:
        """Clear the least important live slots worth at least ``bits_to_remove`` bits; returns bits removed."""
        models = self._models(lr)
        importance = {name: slot_importance(layer.state, *models[name]) for name, layer in self.layers.items()}
        sizes = {name: layer.layout.group_size for name, layer in self.layers.items()}
        return self.clear_slots(select_slots(importance, sizes, bits_to_remove, per_bit))

    def prune_groups(self, bits_to_remove: float, lr: float) -> int:
        """Clear whole groups, least loss increase per bit first; returns bits removed."""
        models = self._models(lr)
        importance = {name: group_importance(layer.state, *models[name]) for name, layer in self.layers.items()}
        live_bits = {name: layer.state.bits_per_group() * layer.layout.group_size
                     for name, layer in self.layers.items()}
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
        self.write_weights()
        return before - self.binary_bits

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{layer: {buffer: tensor}}`` on CPU, for a checkpoint."""
        return {name: {key: t.detach().cpu().clone() for key, t in layer.multibit_tensors().items()}
                for name, layer in self.layers.items()}

    def load_state_tensors(self, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Inverse of :meth:`state_tensors`; refuses missing layers or mismatching shapes before writing."""
        if set(tensors) != set(self.layers):
            raise ValueError(f"checkpoint has multi-bit layers {sorted(tensors)}, the model has {sorted(self.layers)}")
        for name, layer in self.layers.items():
            for key, target in layer.multibit_tensors().items():
                source = tensors[name].get(key)
                if source is None or source.shape != target.shape:
                    found = None if source is None else tuple(source.shape)
                    raise ValueError(f"checkpoint tensor {name}.{key} is {found}, the model expects "
                                     f"{tuple(target.shape)}")
        for name, layer in self.layers.items():
            for key, target in layer.multibit_tensors().items():
                target.copy_(tensors[name][key])
        self.write_weights()

    def scalars(self) -> dict[str, float]:
        return {"weight_step": self.weight_step, "coord_step": self.coord_step, "initial_bits": self.initial_bits}

    def load_scalars(self, scalars: Mapping[str, float]) -> None:
        self.weight_step = int(scalars["weight_step"])
        self.coord_step = int(scalars["coord_step"])
        self.initial_bits = float(scalars["initial_bits"])
