"""Group layouts: how a weight tensor is cut into ``num_groups`` groups of ``group_size`` weights.

A layout is a pure reshape (and, for ``pixelwise``, a permutation) between a weight tensor and a
``[num_groups, group_size]`` matrix. It round-trips exactly.

====================  ===========================  =====================  ==================
structure             one group                    num_groups             group_size
====================  ===========================  =====================  ==================
``kernelwise``        ``W[o, i, ...]`` (one kernel) ``Co * Ci``            ``prod(kernel)``
``pixelwise``         ``W[o, :, tap]``              ``Co * prod(kernel)``  ``Ci``
``channelwise``       ``W[o]`` (one filter)         ``Co``                 ``Ci * prod(kernel)``
``subchannelwise``    a row cut in ``S`` chunks     ``out * S``            ``in / S``
====================  ===========================  =====================  ==================

Conv weights of any dimension (``Conv1d/2d/3d``, grouped or depthwise: ``Ci`` is then the number of
input channels per group) use the first three; Linear weights use ``subchannelwise``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

CONV_STRUCTURES = ("kernelwise", "pixelwise", "channelwise")
LINEAR_STRUCTURES = ("subchannelwise",)
STRUCTURES = CONV_STRUCTURES + LINEAR_STRUCTURES


@dataclass(frozen=True)
class GroupLayout:
    """A structure applied to a weight of a given shape.

    Args:
        structure: one of :data:`STRUCTURES`.
        shape: the weight's shape, ``(out, in)`` for Linear or ``(Co, Ci, *kernel)`` for Conv.
        subchannels: ``S`` for ``subchannelwise`` (must divide ``in``); 1 otherwise.
    """

    structure: str
    shape: tuple[int, ...]
    subchannels: int = 1

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure={self.structure!r} is unknown; allowed: {', '.join(STRUCTURES)}")
        if len(shape) < 2 or any(s < 1 for s in shape):
            raise ValueError(f"shape={shape} must have at least 2 positive dimensions")
        if self.structure in CONV_STRUCTURES and len(shape) < 3:
            raise ValueError(
                f"structure={self.structure!r} needs a Conv weight (Co, Ci, *kernel), got shape={shape}; "
                f"use 'subchannelwise' for Linear weights"
            )
        if self.structure == "subchannelwise":
            if len(shape) != 2:
                raise ValueError(f"structure='subchannelwise' needs a Linear weight (out, in), got shape={shape}")
            if self.subchannels < 1 or shape[1] % self.subchannels:
                divisors = [d for d in range(1, shape[1] + 1) if shape[1] % d == 0]
                raise ValueError(
                    f"subchannels={self.subchannels} must be a positive divisor of the input size {shape[1]}: "
                    f"one of {divisors}"
                )
        elif self.subchannels != 1:
            raise ValueError(f"subchannels={self.subchannels} is only allowed with structure='subchannelwise'")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def group_size(self) -> int:
        co, ci, *kernel = self.shape
        return {
            "kernelwise": math.prod(kernel),
            "pixelwise": ci,
            "channelwise": ci * math.prod(kernel),
            "subchannelwise": ci // self.subchannels,
        }[self.structure]

    @property
    def num_groups(self) -> int:
        return self.numel // self.group_size

    def to_groups(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` of :attr:`shape` -> ``[num_groups, group_size]`` (a copy only for ``pixelwise``)."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not match the layout's shape {self.shape}")
        if self.structure == "pixelwise":
            weight = weight.movedim(1, -1)
        return weight.reshape(self.num_groups, self.group_size)

    def from_groups(self, groups: torch.Tensor) -> torch.Tensor:
        """``[num_groups, group_size]`` -> a tensor of :attr:`shape` (inverse of :meth:`to_groups`)."""
        if self.structure == "pixelwise":
            co, ci, *kernel = self.shape
            return groups.reshape(co, *kernel, ci).movedim(-1, 1).contiguous()
        return groups.reshape(self.shape)

    def describe(self) -> str:
        return f"subchannelwise({self.subchannels})" if self.structure == "subchannelwise" else self.structure


_SPEC = re.compile(r"^(?P<name>[a-z]+)(?:[(:](?P<s>\d+)\)?)?$")


def parse_structure(spec: str) -> tuple[str, int]:
    """``"pixelwise"`` -> ``("pixelwise", 1)``; ``"subchannelwise(4)"`` or ``"subchannelwise:4"`` -> ``(.., 4)``."""
    match = _SPEC.match(str(spec).replace(" ", ""))
    name = match and match["name"]
    if name not in STRUCTURES or (match["s"] is not None and name != "subchannelwise"):
        raise ValueError(
            f"structure={spec!r} is unknown; allowed: {', '.join(CONV_STRUCTURES)}, "
            f"subchannelwise or subchannelwise(S) with S dividing the input size"
        )
    return name, int(match["s"] or 1)


def auto_subchannels(in_features: int, high: int = 1024) -> int:
    """Smallest divisor ``S`` of ``in_features`` whose chunks hold at most ``high`` weights.

    A row of at most ``high`` weights stays whole (``S = 1``).
    """
    return next(s for s in range(1, in_features + 1) if in_features % s == 0 and in_features // s <= high)


def auto_layout(shape: tuple[int, ...] | torch.Size, structure: str | None = None) -> GroupLayout:
    """The layout for a weight ``shape``: ``structure`` if given, else the automatic default.

    Automatic default: Linear -> ``subchannelwise`` with chunks of at most 1024 weights; Conv -> ``pixelwise``
    when ``Ci >= 16``, ``kernelwise`` when the kernel has at least 9 taps, else ``channelwise``.
    """
    shape = tuple(int(s) for s in shape)
    if structure is not None:
        name, subchannels = parse_structure(structure)
        return GroupLayout(name, shape, subchannels)
    if len(shape) == 2:
        return GroupLayout("subchannelwise", shape, auto_subchannels(shape[1]))
    if len(shape) < 3:
        raise ValueError(f"shape={shape} is neither a Linear (out, in) nor a Conv (Co, Ci, *kernel) weight")
    ci, taps = shape[1], math.prod(shape[2:])
    if ci >= 16:
        return GroupLayout("pixelwise", shape)
    return GroupLayout("kernelwise" if taps >= 9 else "channelwise", shape)
