"""Small multi-bit models with random pruning, shared by the export and packed-inference tests."""
from __future__ import annotations

import torch
from torch import nn

from alq_lightning.layers import LayerSelection, attach
from alq_lightning.models import LeNet5
from alq_lightning.network import MultiBitNetwork


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``: a Linear whose weight is stored ``(in, out)`` and used as ``x @ W``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def small_cnn() -> nn.Module:
    """Conv + BatchNorm, grouped conv + BatchNorm, Linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10),
    )


def lenet() -> nn.Module:
    return LeNet5(1, 10, 28)


INPUTS = {small_cnn: (3, 8, 8), lenet: (1, 28, 28)}


def quantized(build, seed: int = 0, max_bits: int = 4, keep: float = 0.6) -> nn.Module:
    """``build()`` with random weights and BatchNorm statistics, initialised, with random slots and some
    whole groups (always group 0) pruned; in eval mode."""
    torch.manual_seed(seed)
    model = build().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
    network = MultiBitNetwork(*attach(model, LayerSelection(max_bits=max_bits)))
    network.initialize()
    gen = torch.Generator().manual_seed(seed)
    chosen = {}
    for name, layer in network.layers.items():
        mask = layer.state.mask
        slots = torch.rand(mask.shape, generator=gen) > keep
        slots |= (torch.rand(mask.shape[0], generator=gen) < 0.2)[:, None]
        slots[0] = True
        chosen[name] = slots & mask
    network.clear_slots(chosen)
    return model


def sample(build, seed: int = 1) -> torch.Tensor:
    return torch.randn(4, *INPUTS[build], generator=torch.Generator().manual_seed(seed))
