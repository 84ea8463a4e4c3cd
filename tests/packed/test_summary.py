"""The printed bit summary, word for word: of a model (``bit_summary``), of a packed file (``packed_summary``
and ``python -m alq_lightning summary``), as text and as a Rich table, with every number worked out by hand below."""
from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn

from alq_lightning.core import LayerBits
from alq_lightning.layers import LayerSelection, attach, find_layers
from alq_lightning.packed.cli import summary_main
from alq_lightning.packed.io import export_packed, packed_summary, read_header
from alq_lightning.summary import BitSummary, FloatRow, LayerRow, bit_summary


class Mixed(nn.Module):
    """A conv and a Linear to quantize, and a float remainder of every kind: a float16 matrix buffer, an
    embedding table left in float, a Linear bias, BatchNorm parameters and buffers (an int64 scalar among them)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.zeros(2, 5, dtype=torch.float16))
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.fc = nn.Linear(16, 4)
        self.table = nn.Embedding(3, 2)
        self.norm = nn.BatchNorm1d(4)


def mixed() -> Mixed:
    """``Mixed`` with ALQ on conv (kernelwise: 6 groups of 9) and fc (subchannelwise(2): 8 groups of 8), 3 slots
    per group; the first half of the slots plus one are live: 10 of 18 in conv, 13 of 24 in fc."""
    torch.manual_seed(0)
    model = Mixed()
    attach(model, LayerSelection(max_bits=3, exclude=["table"], structures={"fc": "subchannelwise(2)"}))
    for layer in find_layers(model).values():
        mask = layer.buffer("mask")
        mask.zero_()
        mask.view(-1)[: mask.numel() // 2 + 1] = True
    return model


# conv: 54 weights, 10 live slots of 9 bits -> 90 bits (avg 90/54 = 1.6667), bases ceil(90/8) = 12 B,
#       coords 10·4 = 40 B (10·2 = 20 B at 16 bits), mask ceil(18/8) = 3 B: 55 B (35 B).
# fc:   64 weights, 13 live slots of 8 bits -> 104 bits (avg 1.625), bases 13 B, coords 52 B (26 B), mask 3 B:
#       68 B (42 B).
# Model: 118 weights, 194 bits -> 1.6441 avg bits; binary 12 + 13 = 25 B; storage 123 B (77 B); float32 size
# 4·118 = 472 B -> 3.8x (6.1x). Remainder: scale 20 B (40 B in float32), table.weight 24 B, then fc.bias,
# norm.weight/bias/running_mean/running_var (16 B each) and norm.num_batches_tracked (int64, 8 B): 6 vectors and
# scalars, 88 B. Whole model 123 + 132 = 255 B (77 + 132 = 209 B); in float32 472 + 40 + 24 + 88 = 624 B -> 2.4x
# (3.0x).
EXPECTED = {
    32: """\
layer  shape    structure          groups  group_size  max_bits  avg_bits  bytes
--------------------------------------------------------------------------------
conv   3x2x3x3  kernelwise              6           9         3    1.6667     55
fc     4x16     subchannelwise(2)       8           8         3     1.625     68
--------------------------------------------------------------------------------
quantized: 118 weights, 1.6441 avg bits, binary 25 B, storage 123 B (32-bit coords), 3.8x smaller than float32
left in float: scale 2x5 float16 20 B
left in float: table.weight 3x2 float32 24 B
float remainder: 6 vectors and scalars (biases, norms, buffers), 88 B
whole model: 255 B = quantized 123 B + float remainder 132 B, 2.4x smaller than float32""",
    16: """\
layer  shape    structure          groups  group_size  max_bits  avg_bits  bytes
--------------------------------------------------------------------------------
conv   3x2x3x3  kernelwise              6           9         3    1.6667     35
fc     4x16     subchannelwise(2)       8           8         3     1.625     42
--------------------------------------------------------------------------------
quantized: 118 weights, 1.6441 avg bits, binary 25 B, storage 77 B (16-bit coords), 6.1x smaller than float32
left in float: scale 2x5 float16 20 B
left in float: table.weight 3x2 float32 24 B
float remainder: 6 vectors and scalars (biases, norms, buffers), 88 B
whole model: 209 B = quantized 77 B + float remainder 132 B, 3.0x smaller than float32""",
}


@pytest.mark.parametrize("coord_bits", [32, 16])
def test_model_summary_text(coord_bits):
    summary = bit_summary(mixed(), coord_bits)
    assert str(summary) == EXPECTED[coord_bits]
    assert summary.table() == [("conv", "3x2x3x3", "kernelwise", 6, 9, 3, 1.6667, 55 if coord_bits == 32 else 35),
                               ("fc", "4x16", "subchannelwise(2)", 8, 8, 3, 1.625, 68 if coord_bits == 32 else 42)]


def test_model_summary_counts_32_bit_coordinates_by_default():
    assert str(bit_summary(mixed())) == EXPECTED[32]


@pytest.mark.parametrize("coord_bits", [32, 16])
def test_packed_file_summary_text(tmp_path, coord_bits, capsys):
    """The header of the exported file gives the same text, and the command line prints it."""
    export_packed(mixed(), tmp_path / "m.alq", coord_bits)
    assert str(packed_summary(read_header(tmp_path / "m.alq"))) == EXPECTED[coord_bits]
    assert summary_main([str(tmp_path / "m.alq")]) == 0
    assert capsys.readouterr().out == EXPECTED[coord_bits] + "\n"


def test_summary_rows_align_names_left_and_numbers_right():
    """Column widths follow the longest cell; 3-D and higher float tensors count as matrices, 1-D and 0-D ones
    as vectors and scalars; without vectors there is no such line."""
    rows = (LayerRow("a.b.c", (7, 3), "subchannelwise(1)", LayerBits(21, 7, 3, 2, 5), 32),
            LayerRow("x", (100, 10), "columnwise(20)", LayerBits(1000, 200, 5, 8, 1600), 16))
    floats = (FloatRow("pos", (1, 4, 8), torch.bfloat16), FloatRow("cls", (1, 1, 2, 2), torch.float64))
    # a.b.c: 15 bits -> avg 15/21 = 0.7143, bytes 2 + 20 + ceil(14/8) = 24; x: 8000 bits -> 8.0, bytes
    # 1000 + 3200 + 200 = 4400. Totals: 1021 weights, 8015 bits -> 7.8501, binary 2 + 1000 B, storage 4424 B,
    # float32 4084 B -> 0.9x. Remainder: pos 64 B (128 B in float32), cls 32 B (16 B in float32): 96 B;
    # whole model 4520 B, (4084 + 128 + 16) / 4520 -> 0.9x.
    expected = """\
layer  shape   structure          groups  group_size  max_bits  avg_bits  bytes
-------------------------------------------------------------------------------
a.b.c  7x3     subchannelwise(1)       7           3         2    0.7143     24
x      100x10  columnwise(20)        200           5         8       8.0   4400
-------------------------------------------------------------------------------
quantized: 1021 weights, 7.8501 avg bits, binary 1002 B, storage 4424 B (32-bit coords), 0.9x smaller than float32
left in float: pos 1x4x8 bfloat16 64 B
left in float: cls 1x1x2x2 float64 32 B
whole model: 4520 B = quantized 4424 B + float remainder 96 B, 0.9x smaller than float32"""
    assert str(BitSummary(rows, 32, floats)) == expected


def test_summary_of_a_model_without_multibit_layers_is_refused():
    with pytest.raises(ValueError, match=r"^Mixed has no multi-bit layer; attach ALQ first \(ALQInit/ALQCallback\)$"):
        bit_summary(Mixed())


def test_summary_command_line_help(capsys):
    with pytest.raises(SystemExit) as done:
        summary_main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m alq_lightning summary [-h] path ")
    assert "per-layer table and totals of a packed file, from its header once the file is verified" in text
    assert "path packed file written by alq_lightning.export_packed" in text


# The Rich table: the layer rows of the text, then the totals as rows (quantized, each float matrix, the vectors
# and scalars, the whole model) and the rest of the totals line in the caption.
RICH_HEADER = ["layer", "shape", "structure", "groups", "group size", "max bits", "avg bits", "bytes"]
RICH_BODY = {
    coord_bits: [
        ["conv", "3x2x3x3", "kernelwise", "6", "9", "3", "1.6667", conv],
        ["fc", "4x16", "subchannelwise(2)", "8", "8", "3", "1.625", fc],
        ["quantized: 118 weights", "", "", "", "", "", "1.6441", storage],
        ["left in float: scale", "2x5", "float16", "", "", "", "", "20"],
        ["left in float: table.weight", "3x2", "float32", "", "", "", "", "24"],
        ["float remainder: 6 vectors and scalars", "", "", "", "", "", "", "88"],
        ["whole model: quantized + 132 B float", "", "", "", "", "", "", model],
    ]
    for coord_bits, conv, fc, storage, model in ((32, "55", "68", "123", "255"), (16, "35", "42", "77", "209"))
}
RICH_CAPTION = {32: "32-bit coords; binary 25 B; 3.8x (quantized) and 2.4x (whole model) smaller than float32",
                16: "16-bit coords; binary 25 B; 6.1x (quantized) and 3.0x (whole model) smaller than float32"}
NUMBER = re.compile(r"\d+(?:\.\d+)?")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def table_cells(text: str, bar: str) -> list[list[str]]:
    """The cells of the lines of a Rich table that start with ``bar`` (``"┃"`` header, ``"│"`` body)."""
    return [[cell.strip() for cell in line.split(bar)[1:-1]] for line in text.splitlines() if line.startswith(bar)]


def rich_text(summary: BitSummary, width: int = 200) -> str:
    pytest.importorskip("rich")
    from rich.console import Console

    console = Console(file=io.StringIO(), record=True, width=width)
    console.print(summary)
    return console.export_text()


@pytest.mark.parametrize("coord_bits", [32, 16])
def test_model_summary_as_a_rich_table_holds_the_numbers_of_the_text(coord_bits):
    summary = bit_summary(mixed(), coord_bits)
    text = rich_text(summary)
    assert table_cells(text, "┃") == [RICH_HEADER]
    assert table_cells(text, "│") == RICH_BODY[coord_bits]
    assert text.rstrip().splitlines()[-1].strip() == RICH_CAPTION[coord_bits]
    assert set(NUMBER.findall(text)) == set(NUMBER.findall(str(summary)))
    assert str(summary) == EXPECTED[coord_bits], "str() stays the plain text"


def test_rich_table_of_a_summary_without_vectors_has_no_such_row():
    summary = BitSummary((LayerRow("x", (100, 10), "columnwise(20)", LayerBits(1000, 200, 5, 8, 1600), 16),), 32,
                         (FloatRow("pos", (1, 4, 8), torch.bfloat16),))
    text = rich_text(summary)
    assert [row[0] for row in table_cells(text, "│")] == ["x", "quantized: 1000 weights", "left in float: pos",
                                                           "whole model: quantized + 64 B float"]
    assert set(NUMBER.findall(text)) == set(NUMBER.findall(str(summary)))


def test_summary_command_prints_a_rich_table_on_a_terminal(tmp_path, capsys, monkeypatch):
    """On a terminal the command prints the Rich table; in a pipe the text (test_packed_file_summary_text)."""
    pytest.importorskip("rich")
    export_packed(mixed(), tmp_path / "m.alq", 16)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # Rich's switch for "stdout is a terminal"
    monkeypatch.setenv("COLUMNS", "200")
    assert summary_main([str(tmp_path / "m.alq")]) == 0
    out = ANSI.sub("", capsys.readouterr().out)
    assert table_cells(out, "┃") == [RICH_HEADER]
    assert table_cells(out, "│") == RICH_BODY[16]
    assert RICH_CAPTION[16] in out
