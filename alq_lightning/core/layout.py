"""Group layouts: how a weight tensor is cut into ``num_groups`` groups of ``group_size`` weights.

A layout is a pure reshape (and, for ``pixelwise``, a permutation) between a weight tensor and a
``[num_groups, group_size]`` matrix. It round-trips exactly.

====================  ===========================  =====================  ==================
structure             one group                    num_groups             group_size
====================  ===========================  =====================  ==================
``kernelwise``        ``W[o, i, ...]`` (one kernel) ``Co * Ci``            ``prod(kernel)``
``pixelwise``         ``W[o, :, tap]``              ``Co * prod(kernel)``  ``Ci``
``channelwise``       ``W[o]`` (one filter)         ``Co``                 ``Ci * prod(kernel)``
``subchannelwise``    a row cut in ``S`` chunks     ``rows * S``           ``W.shape[-1] / S``
``columnwise``        a column cut in ``S`` chunks  ``out * S``            ``in / S``
====================  ===========================  =====================  ==================

Conv weights of any dimension (``Conv1d/2d/3d``, grouped or depthwise: ``Ci`` is then the number of
input channels per group) use the first three. ``subchannelwise`` cuts the last dimension of any weight
of two or more dimensions, every other dimension indexing rows: Linear ``(out, in)``, embedding tables
``(tokens, dim)`` (a group is a token vector or part of it), a fused Q/K/V projection ``(3·E, E)`` (a
group never straddles Q, K and V, which are row blocks), ``Bilinear`` ``(out, in1, in2)``, position
embeddings ``(1, T, D)``. ``columnwise`` is the transposed Linear layout of ``(in, out)`` weights used as
``x @ W`` (Hugging Face's ``Conv1D``): a group holds inputs of one output.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

CONV_STRUCTURES = ("kernelwise", "pixelwise", "channelwise")
LINEAR_STRUCTURES = ("subchannelwise", "columnwise")
STRUCTURES = CONV_STRUCTURES + LINEAR_STRUCTURES


@dataclass(frozen=True)
class GroupLayout:
    """A structure applied to a weight of a given shape.

    Args:
        structure: one of :data:`STRUCTURES`.
        shape: the weight's shape: ``(Co, Ci, *kernel)`` for Conv, ``(..., in)`` for ``subchannelwise``,
            ``(in, out)`` for ``columnwise``.
        subchannels: ``S`` for ``subchannelwise`` / ``columnwise`` (must divide ``in``); 1 otherwise.
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
        if self.structure in LINEAR_STRUCTURES:
            if self.structure == "columnwise" and len(shape) != 2:
                raise ValueError(f"structure='columnwise' needs a transposed Linear weight (in, out), got {shape}")
            size = self.in_features
            if self.subchannels < 1 or size % self.subchannels:
                divisors = [d for d in range(1, size + 1) if size % d == 0]
                raise ValueError(
                    f"subchannels={self.subchannels} must be a positive divisor of the input size {size}: "
                    f"one of {divisors}"
                )
        elif self.subchannels != 1:
            raise ValueError(f"subchannels={self.subchannels} is only allowed with structure='subchannelwise' or "
                             f"'columnwise'")

    @property
    def in_features(self) -> int:
        """The length that ``subchannelwise`` / ``columnwise`` cut into ``subchannels`` chunks."""
        return self.shape[0] if self.structure == "columnwise" else self.shape[-1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def group_size(self) -> int:
        if self.structure in LINEAR_STRUCTURES:
            return self.in_features // self.subchannels
        co, ci, *kernel = self.shape
        return {"kernelwise": math.prod(kernel), "pixelwise": ci, "channelwise": ci * math.prod(kernel)}[self.structure]

    @property
    def num_groups(self) -> int:
        return self.numel // self.group_size

    def to_groups(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` of :attr:`shape` -> ``[num_groups, group_size]`` (a copy only for ``pixelwise``)."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not match the layout's shape {self.shape}")
        if self.structure == "pixelwise":
            weight = weight.movedim(1, -1)
        elif self.structure == "columnwise":
            weight = weight.t()
        return weight.reshape(self.num_groups, self.group_size)

    def from_groups(self, groups: torch.Tensor) -> torch.Tensor:
        """``[num_groups, group_size]`` -> a tensor of :attr:`shape` (inverse of :meth:`to_groups`)."""
        if self.structure == "pixelwise":
            co, ci, *kernel = self.shape
            return groups.reshape(co, *kernel, ci).movedim(-1, 1).contiguous()
        if self.structure == "columnwise":
            return groups.reshape(self.shape[1], self.shape[0]).t().contiguous()
        return groups.reshape(self.shape)

    def weight_view(self, flat: torch.Tensor) -> torch.Tensor:
        """A view of :attr:`shape` over ``flat [num_groups · group_size]`` (contiguous, in group order): writing
        a weight into it writes its groups, row-major (:meth:`to_groups` without a copy)."""
        if self.structure == "pixelwise":
            co, ci, *kernel = self.shape
            return flat.view(co, *kernel, ci).movedim(-1, 1)
        if self.structure == "columnwise":
            return flat.view(self.shape[1], self.shape[0]).t()
        return flat.view(self.shape)

    def describe(self) -> str:
        return f"{self.structure}({self.subchannels})" if self.structure in LINEAR_STRUCTURES else self.structure

    def same_groups(self, other: GroupLayout) -> bool:
        """Whether ``other`` cuts a weight of the same shape into the same groups, weight for weight: equal
        layouts, or equivalent ones such as ``kernelwise`` and ``channelwise`` of a one-input-channel Conv."""
        if (self.shape, self.num_groups, self.group_size) != (other.shape, other.num_groups, other.group_size):
            return False
        index = torch.arange(math.prod(self.shape)).view(self.shape)
        return torch.equal(self.to_groups(index), other.to_groups(index))


_SPEC = re.compile(r"^(?P<name>[a-z]+)(?:[(:](?P<s>\d+)\)?)?$")


def parse_structure(spec: str) -> tuple[str, int]:
    """``"pixelwise"`` -> ``("pixelwise", 1)``; ``"subchannelwise(4)"`` or ``"subchannelwise:4"`` -> ``(.., 4)``."""
    match = _SPEC.match(str(spec).replace(" ", ""))
    name = match and match["name"]
    if name not in STRUCTURES or (match["s"] is not None and name not in LINEAR_STRUCTURES):
        raise ValueError(f"structure={spec!r} is unknown; allowed: {', '.join(STRUCTURES)}; the last two take an "
                         f"optional (S), S dividing the input size")
    return name, int(match["s"] or 1)


def auto_subchannels(in_features: int, high: int = 1024) -> int:
    """Smallest divisor ``S`` of ``in_features`` whose chunks hold at most ``high`` weights.

    A row of at most ``high`` weights stays whole (``S = 1``).
    """
    return next(s for s in range(1, in_features + 1) if in_features % s == 0 and in_features // s <= high)


def auto_layout(shape: tuple[int, ...] | torch.Size, structure: str | None = None, kind: str = "auto") -> GroupLayout:
    """The layout for a weight ``shape``: ``structure`` if given, else the automatic default for its ``kind``.

    ``kind``: ``"conv"`` (``(Co, Ci, *kernel)``): ``pixelwise`` when ``Ci >= 16``, ``kernelwise`` when the
    kernel has at least 9 taps, else ``channelwise``; ``"rows"``: ``subchannelwise`` with chunks of at most
    1024 weights; ``"columns"``: ``columnwise`` likewise; ``"auto"``: ``"rows"`` for two dimensions, ``"conv"``
    for more.
    """
    shape = tuple(int(s) for s in shape)
    if structure is not None:
        name, subchannels = parse_structure(structure)
        return GroupLayout(name, shape, subchannels)
    if kind not in ("auto", "conv", "rows", "columns"):
        raise ValueError(f"kind={kind!r} is unknown; allowed: auto, conv, rows, columns")
    if len(shape) < 2:
        raise ValueError(f"shape={shape} has fewer than 2 dimensions: it is not a weight matrix")
    if kind == "auto":
        kind = "rows" if len(shape) == 2 else "conv"
    if kind == "rows":
        return GroupLayout("subchannelwise", shape, auto_subchannels(shape[-1]))
    if kind == "columns":
        return GroupLayout("columnwise", shape, auto_subchannels(shape[0]))
    if len(shape) < 3:
        raise ValueError(f"shape={shape} is not a Conv weight (Co, Ci, *kernel)")
    ci, taps = shape[1], math.prod(shape[2:])
    if ci >= 16:
        return GroupLayout("pixelwise", shape)
    return GroupLayout("kernelwise" if taps >= 9 else "channelwise", shape)
