"""Model zoo (plain ``nn.Module``s) and the paper's per-layer ALQ presets.

``build_model(name, in_channels, num_classes, input_size)`` builds one of :data:`MODEL_NAMES` (how the export CLI
rebuilds a checkpoint from its ``architecture``); ``model_name(cls)`` names one of the classes;
``paper_structures(name, model)`` gives the paper's structure per quantized layer of a built model.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from alq_lightning.models.lenet import LeNet5
from alq_lightning.models.resnet import BasicBlock, ResNet, ResNet18, ResNet20, ResNet34
from alq_lightning.models.vgg import VGGSmall
from alq_lightning.models.vit import ViTTiny

__all__ = [
    "BasicBlock",
    "LeNet5",
    "MODEL_NAMES",
    "PAPER_MAX_BITS",
    "PAPER_STRUCTURES",
    "ResNet",
    "ResNet18",
    "ResNet20",
    "ResNet34",
    "VGGSmall",
    "ViTTiny",
    "build_model",
    "model_name",
    "paper_structures",
]

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lambda c, k, s, **kw: LeNet5(c, k, s, **kw),
    "vgg_small": lambda c, k, s, **kw: VGGSmall(c, k, s, **kw),
    "resnet20": lambda c, k, s, **kw: ResNet20(c, k, **kw),
    "resnet18": lambda c, k, s, **kw: ResNet18(c, k, s, **kw),
    "resnet34": lambda c, k, s, **kw: ResNet34(c, k, s, **kw),
    "vit_tiny": lambda c, k, s, **kw: ViTTiny(c, k, s, **kw),
}
_DEFAULTS: dict[str, Callable[[], nn.Module]] = {
    "lenet5": LeNet5,
    "vgg_small": VGGSmall,
    "resnet20": ResNet20,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "vit_tiny": ViTTiny,
}
MODEL_NAMES: tuple[str, ...] = tuple(_FACTORIES)

PAPER_MAX_BITS: dict[str, int] = {"lenet5": 6, "vgg_small": 6, "resnet20": 6, "resnet18": 8, "resnet34": 8,
                                  "vit_tiny": 6}

# Per model: (structure of the first conv, structure of the other convs, S of each Linear in order, or one S for
# every Linear). The paper has no transformer: vit_tiny's preset follows its rules (the patch embedding is the
# first conv; every Linear row, 64-128 weights at dim 64, is one group, as in LeNet5's last FC layer).
_PAPER_RULES: dict[str, tuple[str, str, tuple[int, ...] | int]] = {
    "lenet5": ("kernelwise", "kernelwise", (2, 1)),
    "vgg_small": ("channelwise", "pixelwise", (16, 2, 2)),
    "resnet20": ("channelwise", "pixelwise", (2,)),
    "resnet18": ("channelwise", "pixelwise", (2,)),
    "resnet34": ("channelwise", "pixelwise", (2,)),
    "vit_tiny": ("channelwise", "pixelwise", 1),
}


def check_model_name(name: str) -> str:
    """Return ``name`` if it is one of :data:`MODEL_NAMES`, else raise ``ValueError``."""
    if name not in _FACTORIES:
        raise ValueError(f"name={name!r} is not a known model; allowed: {', '.join(MODEL_NAMES)}")
    return name


def build_model(name: str, in_channels: int, num_classes: int, input_size: int, **kwargs: Any) -> nn.Module:
    """Build model ``name`` for ``[B, in_channels, input_size, input_size]`` inputs and ``num_classes`` logits.

    ``kwargs`` go to the constructor (``width`` for ``vgg_small`` and ``resnet20``; ``patch_size``, ``dim``,
    ``depth``, ``heads``, ``mlp_ratio`` and ``dropout`` for ``vit_tiny``). ``resnet20`` is fully convolutional
    and ignores ``input_size``.
    """
    return _FACTORIES[check_model_name(name)](in_channels, num_classes, input_size, **kwargs)


def model_name(factory: Any) -> str | None:
    """The name (one of :data:`MODEL_NAMES`) of the package's model class ``factory``; None for anything else,
    such as a user's own network class."""
    return next((name for name, cls in _DEFAULTS.items() if cls is factory), None)


def largest_divisor_at_most(value: int, limit: int) -> int:
    """The largest divisor of ``value`` that is ``<= limit`` (at least 1)."""
    return next(d for d in range(min(value, limit), 0, -1) if value % d == 0)


def paper_structures(name: str, model: nn.Module | None = None) -> dict[str, str]:
    """The paper's structure for every Conv2d and Linear of ``model`` (default: ``name`` at its defaults).

    Keys are exact module names (from ``named_modules``), so each pattern matches exactly one layer.
    The first conv gets the model's first-conv structure, every other conv (shortcuts included) the
    other-conv structure; the Linear layers, in order, get ``subchannelwise(S)`` with the paper's ``S``,
    lowered to the largest divisor of ``in_features`` not above it (width-reduced models stay valid).
    ``vit_tiny``, which the paper does not cover, gets its rules: ``channelwise`` patch embedding and
    ``subchannelwise(1)`` for every Linear (attention ``out_proj``, MLPs, head). Raw Parameters (its
    ``in_proj_weight``, class token, position embedding) are not modules and are not named here: they take
    the automatic layout, which for rows of up to 1024 weights is the same one group per row.
    """
    first, other, subchannels = _PAPER_RULES[check_model_name(name)]
    if model is None:
        with torch.device("meta"):
            model = _DEFAULTS[name]()
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(subchannels, int):
        subchannels = (subchannels,) * len(linears)
    if not convs or len(linears) != len(subchannels):
        raise ValueError(
            f"model has {len(convs)} Conv2d and {len(linears)} Linear layers; the {name!r} preset needs at least "
            f"one Conv2d and exactly {len(subchannels)} Linear layers"
        )
    structures = {n: first if i == 0 else other for i, (n, _) in enumerate(convs)}
    for (n, linear), s in zip(linears, subchannels):
        structures[n] = f"subchannelwise({largest_divisor_at_most(linear.in_features, s)})"
    return structures


def __getattr__(attr: str) -> Any:
    if attr == "PAPER_STRUCTURES":
        presets = {name: paper_structures(name) for name in MODEL_NAMES}
        globals()["PAPER_STRUCTURES"] = presets
        return presets
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
