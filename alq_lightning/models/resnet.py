"""ResNets: ResNet-20 for CIFAR and ResNet-18/34 for ImageNet (torchvision-compatible names)."""
from __future__ import annotations

import torch
from torch import nn

from alq_lightning.models.lenet import check_positive_int

SMALL_INPUT_LIMIT = 64


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """A 3×3 conv with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus a shortcut; a 1×1 conv-BN ``downsample`` (option B) when the shape changes.

    Shapes: ``[B, in_planes, H, W]`` -> ``[B, planes, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs, BatchNorm to identity, as torchvision does."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ResNet(nn.Module):
    """A BasicBlock ResNet: stem, ``len(blocks)`` stages (``layer1``, ...), global average pool, ``fc``.

    Stage ``i`` has ``blocks[i]`` blocks of ``planes[i]`` channels; every stage but the first starts with
    stride 2. The stem is 7×7 stride 2 + 3×3 max-pool (``big_stem``) or 3×3 stride 1 with no pool.

    Shapes: ``[B, in_channels, H, W]`` -> ``[B, num_classes]``.
    """

    def __init__(
        self, blocks: list[int], planes: list[int], in_channels: int, num_classes: int, big_stem: bool
    ) -> None:
        super().__init__()
        check_positive_int(in_channels=in_channels, num_classes=num_classes)
        if len(blocks) != len(planes) or not blocks:
            raise ValueError(f"blocks={blocks} and planes={planes} must be non-empty and of equal length")
        if big_stem:
            self.conv1 = nn.Conv2d(in_channels, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, planes[0])
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        previous = planes[0]
        for index, (count, width) in enumerate(zip(blocks, planes)):
            stride = 1 if index == 0 else 2
            stage = [BasicBlock(previous if i == 0 else width, width, stride if i == 0 else 1) for i in range(count)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
            previous = width
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


class ResNet20(ResNet):
    """CIFAR ResNet-20: 3×3 stem, 3 stages × 3 BasicBlocks of ``width``, ``2·width``, ``4·width`` channels.

    Shortcuts are 1×1 conv + BN (option B) where the shape changes. 272 474 parameters at the defaults.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        check_positive_int(width=width)
        super().__init__([3, 3, 3], [width, 2 * width, 4 * width], in_channels, num_classes, big_stem=False)


def check_input_size(input_size: int) -> bool:
    """Validate ``input_size``; return whether it takes the ImageNet stem (``input_size >= 64``)."""
    check_positive_int(input_size=input_size)
    return input_size >= SMALL_INPUT_LIMIT


class ResNet18(ResNet):
    """ImageNet ResNet-18 (BasicBlocks [2, 2, 2, 2], 64..512 channels; 11 689 512 parameters at 1000 classes).

    Inputs smaller than 64 pixels get a 3×3 stride-1 stem without max-pool.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, input_size: int = 224) -> None:
        big_stem = check_input_size(input_size)
        super().__init__([2, 2, 2, 2], [64, 128, 256, 512], in_channels, num_classes, big_stem)


class ResNet34(ResNet):
    """ImageNet ResNet-34 (BasicBlocks [3, 4, 6, 3], 64..512 channels; 21 797 672 parameters at 1000 classes).

    Inputs smaller than 64 pixels get a 3×3 stride-1 stem without max-pool.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, input_size: int = 224) -> None:
        big_stem = check_input_size(input_size)
        super().__init__([3, 4, 6, 3], [64, 128, 256, 512], in_channels, num_classes, big_stem)
