"""``bit_summary``: per-layer bits and storage of a multi-bit model, printable and loggable.

Whole-model figures sit next to the quantized part: every ``state_dict`` tensor that is not a quantized
weight (biases, norms, buffers, weights left in float) is the *float remainder*, listed with its size and
counted at its own dtype's bits — exactly what :func:`~alq_lightning.export_packed` stores besides the layers.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .activations import act_bits_of, positions_of
from .core import LayerBits, average_bits, check_coord_bits
from .layers import QuantizedLayer, find_layers, float_remainder, sharded_layers


@dataclass(frozen=True)
class FloatRow:
    """One tensor of the float remainder, stored as it is."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def float32_bytes(self) -> int:
        """Its size with floating-point values in float32 (the uncompressed model's reference)."""
        return 4 * self.numel if self.dtype.is_floating_point else self.bytes


@dataclass(frozen=True)
class LayerRow:
    """One quantized layer; ``act_bits`` are its input's binary bases (0: float input) and ``positions`` its
    output positions per sample in the last forward (0: not measured)."""

    name: str
    shape: tuple[int, ...]
    structure: str
    bits: LayerBits
    coord_bits: int
    act_bits: int = 0
    positions: int = 0

    @property
    def avg_bits(self) -> float:
        return self.bits.avg_bits

    @property
    def macs(self) -> int:
        """Multiply-accumulates per sample of the float layer: positions × weights."""
        return self.positions * self.bits.numel

    @property
    def bops(self) -> int:
        """Binary operations per sample: positions × live weight bases of every weight × input bases."""
        return self.positions * self.bits.binary_bits * self.act_bits

    @property
    def storage_bytes(self) -> int:
        return self.bits.storage_bytes(self.coord_bits)


@dataclass(frozen=True)
class BitSummary:
    """Per-layer rows and totals. ``storage_bytes`` counts bases, live coordinates and masks;
    ``binary_bytes`` counts bases only; ``float_bytes`` is what the quantized weights take in float32.
    ``floats`` is the float remainder; ``model_bytes`` = ``storage_bytes`` + its bytes, the packed file's
    payload; ``model_compression`` compares it with the whole model in float32."""

    rows: tuple[LayerRow, ...]
    coord_bits: int
    floats: tuple[FloatRow, ...] = ()

    @property
    def remainder_bytes(self) -> int:
        return sum(row.bytes for row in self.floats)

    @property
    def model_bytes(self) -> int:
        return self.storage_bytes + self.remainder_bytes

    @property
    def model_compression(self) -> float:
        """The whole model in float32 over its multi-bit storage plus the float remainder."""
        return (self.float_bytes + sum(row.float32_bytes for row in self.floats)) / max(self.model_bytes, 1)

    @property
    def numel(self) -> int:
        return sum(row.bits.numel for row in self.rows)

    @property
    def avg_bits(self) -> float:
        return average_bits([row.bits for row in self.rows])

    @property
    def binary_bytes(self) -> int:
        return sum(-(-row.bits.binary_bits // 8) for row in self.rows)

    @property
    def storage_bytes(self) -> int:
        return sum(row.storage_bytes for row in self.rows)

    @property
    def float_bytes(self) -> int:
        return 4 * self.numel

    @property
    def compression(self) -> float:
        """float32 size of the quantized weights over their multi-bit storage."""
        return self.float_bytes / max(self.storage_bytes, 1)

    HEADER = ("layer", "shape", "structure", "groups", "group_size", "max_bits", "avg_bits", "bytes")
    ACT_HEADER = ("act_bits", "BOPs")

    @property
    def act_rows(self) -> tuple[LayerRow, ...]:
        """Layers whose input is quantized."""
        return tuple(row for row in self.rows if row.act_bits)

    @property
    def bops(self) -> int:
        """Binary operations per sample of the layers with quantized inputs (last forward)."""
        return sum(row.bops for row in self.rows)

    @property
    def macs(self) -> int:
        """Multiply-accumulates per sample the same layers take in float (last forward): what the BOPs replace."""
        return sum(row.macs for row in self.act_rows)

    @property
    def header(self) -> tuple[str, ...]:
        """:attr:`HEADER`, plus :attr:`ACT_HEADER` when some layer's input is quantized."""
        return self.HEADER + (self.ACT_HEADER if self.act_rows else ())

    def table(self) -> list[tuple]:
        """Rows of :attr:`header` values, one per layer (``act_bits`` 0 and BOPs 0 for a float input)."""
        acts = bool(self.act_rows)
        return [(r.name, "x".join(map(str, r.shape)), r.structure, r.bits.num_groups, r.bits.group_size,
                 r.bits.max_bits, round(r.avg_bits, 4), r.storage_bytes, *((r.act_bits, r.bops) if acts else ()))
                for r in self.rows]

    def __str__(self) -> str:
        cells = [tuple(map(str, self.header))] + [tuple(map(str, row)) for row in self.table()]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.header))]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in cells]
        rule = "-" * len(lines[0])
        totals = (f"quantized: {self.numel} weights, {self.avg_bits:.4f} avg bits, binary {self.binary_bytes} B, "
                  f"storage {self.storage_bytes} B ({self.coord_bits}-bit coords), "
                  f"{self.compression:.1f}x smaller than float32")
        return "\n".join([lines[0], rule, *lines[1:], rule, totals, *self._act_lines(), *self._remainder_lines()])

    def _act_lines(self) -> list[str]:
        if not self.act_rows:
            return []
        bits = "/".join(str(b) for b in sorted({row.act_bits for row in self.act_rows}))
        counted = (f"{self.bops} BOPs and {self.macs} float MACs per sample (last forward)"
                   if all(row.positions for row in self.act_rows) else "BOPs are counted once a forward pass ran")
        return [f"activations: {len(self.act_rows)} of {len(self.rows)} layer inputs at {bits} bits; {counted}"]

    def _float_parts(self) -> tuple[list[FloatRow], list[FloatRow]]:
        """The float remainder as ``(matrices, vectors and scalars)``: matrices are weights left in float."""
        return [row for row in self.floats if len(row.shape) >= 2], [row for row in self.floats if len(row.shape) < 2]

    def _remainder_lines(self) -> list[str]:
        """Float matrices left out, one line each; vectors and scalars in one line; the whole model."""
        matrices, rest = self._float_parts()
        lines = [f"left in float: {row.name} {'x'.join(map(str, row.shape))} {str(row.dtype).removeprefix('torch.')} "
                 f"{row.bytes} B" for row in matrices]
        if rest:
            lines.append(f"float remainder: {len(rest)} vectors and scalars (biases, norms, buffers), "
                         f"{sum(row.bytes for row in rest)} B")
        lines.append(f"whole model: {self.model_bytes} B = quantized {self.storage_bytes} B + float remainder "
                     f"{self.remainder_bytes} B, {self.model_compression:.1f}x smaller than float32")
        return lines

    def __rich__(self) -> Any:
        """The table of ``str(summary)`` as a ``rich.table.Table`` (``rich.print(summary)``), the same numbers:
        one row per layer, the quantized total, the float tensors left out, the whole model; the rest of the
        totals in its caption."""
        from rich.table import Table

        table = Table(caption=f"{self.coord_bits}-bit coords; binary {self.binary_bytes} B; "
                              f"{self.compression:.1f}x (quantized) and {self.model_compression:.1f}x (whole model) "
                              f"smaller than float32", caption_justify="left")
        for index, heading in enumerate(self.header):
            table.add_column(heading.replace("_", " "), justify="left" if index < 3 else "right")
        for row in self.table():
            table.add_row(*map(str, row))
        table.add_section()
        blank = ("",) * (len(self.HEADER) - 5)  # groups, group size, max bits
        tail = ("",) * (len(self.header) - len(self.HEADER))
        acts = (str(self.bops),) if tail else ()
        table.add_row(f"quantized: {self.numel} weights", "", "", *blank, f"{self.avg_bits:.4f}",
                      str(self.storage_bytes), *tail[:len(tail) - len(acts)], *acts, style="bold")
        matrices, rest = self._float_parts()
        for row in matrices:
            table.add_row(f"left in float: {row.name}", "x".join(map(str, row.shape)),
                          str(row.dtype).removeprefix("torch."), *blank, "", str(row.bytes), *tail)
        if rest:
            table.add_row(f"float remainder: {len(rest)} vectors and scalars", "", "", *blank, "",
                          str(sum(row.bytes for row in rest)), *tail)
        table.add_row(f"whole model: quantized + {self.remainder_bytes} B float", "", "", *blank, "",
                      str(self.model_bytes), *tail, style="bold")
        return table


def summarize_sharded(model: nn.Module, layers: Mapping[str, QuantizedLayer], coord_bits: int = 32) -> BitSummary:
    """:func:`~alq_lightning.bit_summary` of a sharded ``model`` whose layers are ``layers``: the whole model's,
    every process gets the same (one reduction of live slots). Collective."""
    check_coord_bits(coord_bits)
    group = next(iter(layers.values())).param.device_mesh.get_group()
    live = torch.stack([layer.buffer("mask").sum().long().cpu() for layer in layers.values()])
    dist.all_reduce(live, group=group)
    rows = tuple(LayerRow(name, layer.full_layout.shape, layer.full_layout.describe(),
                          LayerBits(layer.full_layout.numel, layer.full_layout.num_groups, layer.full_layout.group_size,
                                    layer.state.max_bits, slots), coord_bits,
                          *((act_bits_of(layer.module), positions_of(layer.module)) if layer.attr == "weight" else ()))
                 for (name, layer), slots in zip(layers.items(), live.tolist()))
    floats = tuple(FloatRow(key, tuple(tensor.shape), tensor.dtype)
                   for key, tensor in float_remainder(model, layers).items())
    return BitSummary(rows, coord_bits, floats)


def bit_summary(model: nn.Module, coord_bits: int = 32) -> BitSummary:
    """Summarise every multi-bit layer of ``model`` (coordinates counted at ``coord_bits``: 16 or 32); a model sharded
    by FSDP2 is summarised whole, a call on every process."""
    check_coord_bits(coord_bits)
    layers = find_layers(model)
    if not layers:
        shards = sharded_layers(model)
        if shards:
            return summarize_sharded(model, shards, coord_bits)
        raise ValueError(f"{type(model).__name__} has no multi-bit layer; attach ALQ first (ALQInit/ALQCallback)")
    rows = tuple(
        LayerRow(name, layer.layout.shape, layer.layout.describe(), layer.bits, coord_bits,
                 *((act_bits_of(layer.module), positions_of(layer.module)) if layer.attr == "weight" else ()))
        for name, layer in layers.items()
    )
    floats = tuple(FloatRow(key, tuple(tensor.shape), tensor.dtype)
                   for key, tensor in float_remainder(model, layers).items())
    return BitSummary(rows, coord_bits, floats)



if __name__ == "__main__":  # the module that once held the summary command says where it went
    raise SystemExit("alq_lightning.summary is not a command: run `alq-summary FILE.alq` or "
                     "`python -m alq_lightning summary FILE.alq`")
