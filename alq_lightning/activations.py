"""Multi-bit activations on the inputs of a model's Linear and Conv layers (ALGORITHM.md §7).

A forward pre-hook replaces a layer's input by its multi-bit form ``Σ_j γ_j b_j``
(:func:`~alq_lightning.core.activations.quantize_activations`); the model's code is untouched. The coordinates
``γ [C, J]`` (``C = 1`` per layer, or one row per input channel) live on the module as non-persistent buffers:

    alq_act_coords [C, J] (float32, stored as int32)    alq_act_signed []  bool    alq_act_ready [] bool

In training each batch refits ``γ`` (alternating nearest-level assignment and least squares from the running
``γ``), averaged over DDP ranks, and the running ``γ`` moves toward it by ``1 - momentum``; the first batch
decides the codes: ``{0,1}`` when no input on any rank is negative (after a ReLU), else ``±1``, and sets ``γ``.
In evaluation ``γ`` is frozen. Straight-through gradients, clipped to the level range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .core.activations import fit_levels, quantize_activations

ACT_PREFIX = "alq_act_"
CHECKPOINT_KEY = "alq_activations"  # a Lightning checkpoint's {layer: {"coords", "signed", "ready"}}
MAX_ACT_BITS = 8


def channels_of(module: nn.Module) -> int:
    """Input channels (Conv) or features (Linear) of ``module``."""
    return module.in_channels if isinstance(module, nn.modules.conv._ConvNd) else module.in_features


def _mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())
    return tensor


def _any_negative(x: torch.Tensor) -> bool:
    low = x.amin().reshape(1).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(low.item() < 0)


@dataclass(eq=False)
class ActivationLayer:
    """The input quantizer of one Linear or Conv ``module`` (named ``name``) with ``act_bits`` bases.

    ``enabled`` switches quantization on (the callback decides when).
    """

    name: str
    module: nn.Module
    act_bits: int
    per_channel: bool = False
    momentum: float = 0.9
    iterations: int = 2
    enabled: bool = False
    _flags: tuple[bool, bool] | None = None  # (ready, signed) read from the buffers once, not at every forward

    def buffer(self, key: str) -> torch.Tensor:
        stored = getattr(self.module, ACT_PREFIX + key)
        return stored.view(torch.float32) if key == "coords" else stored

    @property
    def coords(self) -> torch.Tensor:
        return self.buffer("coords")

    @property
    def ready(self) -> bool:
        if self._flags is None:
            self._flags = (bool(self.buffer("ready")), bool(self.buffer("signed")))
        return self._flags[0]

    @property
    def signed(self) -> bool:
        return self.ready and self._flags[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {key: self.buffer(key) for key in ("coords", "signed", "ready")}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            self.buffer(key).copy_(value)
        self._flags = None

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[C, n]``: one row per input channel (dimension 1 of a Conv input, the last of a Linear's),
        or the whole tensor in one row."""
        if not self.per_channel:
            return x.reshape(1, -1)
        channel = 1 if isinstance(self.module, nn.modules.conv._ConvNd) else x.dim() - 1
        return x.movedim(channel, 0).reshape(x.shape[channel], -1)

    def _restore(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if not self.per_channel:
            return rows.reshape(like.shape)
        channel = 1 if isinstance(self.module, nn.modules.conv._ConvNd) else like.dim() - 1
        moved = like.movedim(channel, 0).shape
        return rows.reshape(moved).movedim(0, channel)

    def fit(self, rows: torch.Tensor) -> None:
        """Refit ``γ`` to one training batch ``rows [C, n]`` (float32) and move the running ``γ`` toward it."""
        coords = self.coords
        if not self.ready:
            signed = _any_negative(rows)
            self.buffer("signed").fill_(signed)
            coords.copy_(_mean_over_ranks(fit_levels(rows, self.act_bits, signed, iterations=self.iterations)))
            self.buffer("ready").fill_(True)
            self._flags = (True, signed)
            return
        batch = fit_levels(rows, self.act_bits, self.signed, coords=coords, iterations=self.iterations)
        coords.lerp_(_mean_over_ranks(batch), 1 - self.momentum)

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        fitting = module.training and torch.is_grad_enabled()
        if not self.enabled or not (fitting or self.ready):  # unfitted levels would all be 0: the input stays float
            return None
        x = args[0]
        rows = self._channels(x.float())
        if fitting:
            self.fit(rows.detach())
        quantized = quantize_activations(rows, self.coords, self.signed)
        return (self._restore(quantized, x).to(x.dtype), *args[1:])

    @staticmethod
    def record_positions(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Keep on ``module`` its output positions per sample (1 for a Linear on ``[B, in]``, ``H·W`` for a 2-d
        Conv) of the last forward: :func:`~alq_lightning.bit_summary` counts MACs and BOPs with it."""
        features = output.shape[1] if isinstance(module, nn.modules.conv._ConvNd) else output.shape[-1]
        module._alq_act_positions = output.numel() // max(output.shape[0] * features, 1)


def has_input_quantizer(module: nn.Module) -> bool:
    """Whether an input quantizer's hooks are attached to ``module`` (fitted or not)."""
    return bool(getattr(module, "_alq_act_handles", ())) and hasattr(module, ACT_PREFIX + "coords")


def act_bits_of(module: nn.Module) -> int:
    """Binary bases of ``module``'s quantized input: 0 when its input stays float (no quantizer attached, or one
    that no training batch has fitted yet, which passes its input through)."""
    if not has_input_quantizer(module) or not bool(getattr(module, ACT_PREFIX + "ready")):
        return 0
    return getattr(module, ACT_PREFIX + "coords").shape[1]


def positions_of(module: nn.Module) -> int:
    """Output positions per sample of ``module``'s last forward with activation hooks (0 before any)."""
    return getattr(module, "_alq_act_positions", 0)


def attach_activations(modules: dict[str, nn.Module], act_bits: int, per_channel: bool = False,
                       momentum: float = 0.9, iterations: int = 2) -> dict[str, ActivationLayer]:
    """Register the buffers and hooks of an :class:`ActivationLayer` on each Linear/Conv of ``modules`` (by
    layer name); idempotent (buffers of the right shape are kept, hooks replace earlier ones)."""
    layers = {}
    for name, module in modules.items():
        channels = channels_of(module) if per_channel else 1
        existing = getattr(module, ACT_PREFIX + "coords", None)
        if existing is None or tuple(existing.shape) != (channels, act_bits):
            module.register_buffer(ACT_PREFIX + "coords", torch.zeros(channels, act_bits, dtype=torch.int32,
                                                                      device=module.weight.device), persistent=False)
            for key in ("signed", "ready"):
                module.register_buffer(ACT_PREFIX + key, torch.zeros((), dtype=torch.bool,
                                                                     device=module.weight.device), persistent=False)
        detach_activations(module)
        layer = ActivationLayer(name, module, act_bits, per_channel, momentum, iterations)
        module._alq_act_handles = (module.register_forward_pre_hook(layer),
                                   module.register_forward_hook(layer.record_positions))
        layers[name] = layer
    return layers


def detach_activations(module: nn.Module) -> None:
    """Remove ``module``'s input-quantizer hooks, if any (its buffers stay, unused)."""
    for handle in getattr(module, "_alq_act_handles", ()):
        handle.remove()
    module._alq_act_handles = ()


def find_bypassed(model: nn.Module) -> dict[int, str]:
    """``{id(module): why}`` of the Linear modules of ``model`` whose weight is read without calling the module, so
    that an input hook on them would never run: the ``out_proj`` of every ``nn.MultiheadAttention``
    (``F.multi_head_attention_forward`` reads its weight and bias directly)."""
    return {id(module.out_proj): "read directly by nn.MultiheadAttention: its forward, and an input hook, never runs"
            for module in model.modules() if isinstance(module, nn.MultiheadAttention)}


def is_quantizable_input(module: nn.Module) -> bool:
    """Whether ``module``'s input can be quantized here: a Linear or a Conv (other modules' inputs are indices,
    or feed several products)."""
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and math.prod(module.weight.shape) > 0
