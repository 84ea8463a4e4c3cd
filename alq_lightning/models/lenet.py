"""LeNet5 as used by ALQ on MNIST / Fashion-MNIST."""
from __future__ import annotations

import torch
from torch import nn


def check_positive_int(**values: int) -> None:
    """Raise ``ValueError`` unless every keyword value is an integer >= 1."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


class LeNet5(nn.Module):
    """conv(in→20, 5×5) → maxpool 2 → ReLU → conv(20→50, 5×5) → maxpool 2 → ReLU → FC(50·s²→500) → ReLU → FC.

    ``s = ((input_size - 4) // 2 - 4) // 2`` (4 for 28×28 inputs, so ``fc1`` has 800 inputs).

    Args:
        in_channels: image channels.
        num_classes: number of output logits.
        input_size: height = width of the square input; at least 16.

    Shapes: ``[B, in_channels, input_size, input_size]`` -> ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> None:
        super().__init__()
        check_positive_int(in_channels=in_channels, num_classes=num_classes, input_size=input_size)
        side = ((input_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"input_size={input_size} is too small for LeNet5; allowed: input_size >= 16")
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.pool(self.conv1(x)))
        x = self.relu(self.pool(self.conv2(x)))
        x = self.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
