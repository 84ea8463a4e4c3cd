"""VGG-small of LQ-Nets / ALQ for CIFAR-sized inputs."""
from __future__ import annotations

import torch
from torch import nn

from alq_lightning.models.lenet import check_positive_int

VGG_SMALL_CHANNELS = (128, 128, 256, 256, 512, 512)
VGG_SMALL_HIDDEN = 1024


def scale_width(channels: int, width: float) -> int:
    """``round(channels * width)``, at least 1."""
    return max(1, round(channels * width))


class VGGSmall(nn.Module):
    """Six 3×3 convs (128, 128, 256, 256, 512, 512) in three stages, then three Linear layers (1024, 1024, classes).

    Each conv (``bias=False``) is followed by BatchNorm2d + ReLU; the second conv of each stage is followed by
    a 2×2 max-pool placed, as in the authors' code, between the conv and its BatchNorm
    (conv → pool → BN → ReLU). The classifier is Linear → BN1d → ReLU, Linear → BN1d → ReLU, Linear.

    Module names: ``features.{0,3,7,10,14,17}`` are the convs, ``classifier.{0,3,6}`` the Linear layers.

    Args:
        in_channels: image channels.
        num_classes: number of output logits.
        input_size: height = width of the square input; at least 8 (the last stage is ``input_size // 8``).
        width: multiplier of every channel count and of the hidden FC size (rounded, at least 1).

    Shapes: ``[B, in_channels, input_size, input_size]`` -> ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: float = 1.0) -> None:
        super().__init__()
        check_positive_int(in_channels=in_channels, num_classes=num_classes, input_size=input_size)
        if input_size < 8:
            raise ValueError(f"input_size={input_size} is too small for VGGSmall; allowed: input_size >= 8")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ValueError(f"width={width!r} must be a positive number")
        channels = [scale_width(c, width) for c in VGG_SMALL_CHANNELS]
        hidden = scale_width(VGG_SMALL_HIDDEN, width)
        layers: list[nn.Module] = []
        previous = in_channels
        for index, out in enumerate(channels):
            layers.append(nn.Conv2d(previous, out, kernel_size=3, padding=1, bias=False))
            if index % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            previous = out
        self.features = nn.Sequential(*layers)
        side = input_size // 8
        self.classifier = nn.Sequential(
            nn.Linear(channels[-1] * side * side, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
