"""What the reader says about files that are not intact packed files, what ``export_packed`` reports, how a
model that differs from the file in its float tensors is named, and the byte-level helpers of the format."""
from __future__ import annotations

import hashlib
import json
import struct
import sys

import pytest
import torch
from torch import nn

from alq_lightning.layers import LayerSelection, attach, find_layers
from alq_lightning.network import MultiBitNetwork
from alq_lightning.packed.format import (
    CHECKSUM_BYTES,
    PREAMBLE,
    pack_bits,
    tensor_bytes,
    tensor_from_bytes,
    unpack_bits,
)
from alq_lightning.packed.inference import load_packed_for_inference
from alq_lightning.packed.io import ExportReport, export_packed, load_packed, read_header, read_packed
from alq_lightning.summary import bit_summary


class Scaled(nn.Module):
    """Two Linears and a float ``scale`` buffer (a matrix that is not a weight)."""

    def __init__(self, scale_shape: tuple[int, ...] = (2, 5), extra: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 10)
        self.out = nn.Linear(10, 3)
        self.register_buffer("scale", torch.ones(scale_shape))
        if extra:
            self.register_buffer("extra", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x) * self.scale.sum())


def scaled(include: tuple[str, ...] = ("*",)) -> Scaled:
    torch.manual_seed(0)
    model = Scaled()
    model.scale.uniform_(0.5, 1.5)
    MultiBitNetwork(*attach(model, LayerSelection(max_bits=3, include=include))).initialize()
    return model


@pytest.fixture
def packed_file(tmp_path):
    path = tmp_path / "m.alq"
    export_packed(scaled(), path)
    return path


def with_preamble(data: bytes, version: int) -> bytes:
    magic, _, length, size = PREAMBLE.unpack(data[:PREAMBLE.size])
    return PREAMBLE.pack(magic, version, length, size) + data[PREAMBLE.size:]


@pytest.mark.parametrize("change,message", [
    (lambda data: data[:9], "is not an ALQ packed file (bad magic bytes)"),
    (lambda data: b"ALQPACK\x01" + data[8:], "is not an ALQ packed file (bad magic bytes)"),
    (lambda data: data[:10], "is truncated: 10 bytes, shorter than the 22-byte preamble"),
    (lambda data: data[:21], "is truncated: 21 bytes, shorter than the 22-byte preamble"),
    (lambda data: with_preamble(data, 0), "has packed format version 0, which does not exist"),
    (lambda data: with_preamble(data, 3), "has packed format version 3; this alq_lightning reads versions up to 2: "
                                          "upgrade alq_lightning to load it"),
    (lambda data: with_preamble(data, 65535), "has packed format version 65535; this alq_lightning reads versions up "
                                              "to 2: upgrade alq_lightning to load it"),
], ids=["9 bytes", "magic", "10 bytes", "21 bytes", "version 0", "version 3", "version 65535"])
def test_preamble_problems_are_named_by_both_readers(packed_file, change, message):
    packed_file.write_bytes(change(packed_file.read_bytes()))
    for read in (read_packed, read_header):
        with pytest.raises(ValueError) as error:
            read(packed_file)
        assert str(error.value) == f"{packed_file} {message}", read.__name__


@pytest.mark.parametrize("extra", [-1, 1, 100])
def test_size_differing_from_the_preamble(packed_file, extra):
    data = packed_file.read_bytes()
    packed_file.write_bytes(data[:extra] if extra < 0 else data + bytes(extra))
    state = "truncated" if extra < 0 else "longer than written"
    with pytest.raises(ValueError) as error:
        read_packed(packed_file)
    assert str(error.value) == f"{packed_file} is {state}: {len(data) + extra} bytes, its preamble says {len(data)}"


def test_header_cut_short(packed_file):
    packed_file.write_bytes(packed_file.read_bytes()[:PREAMBLE.size + 5])
    with pytest.raises(ValueError) as error:
        read_header(packed_file)
    assert str(error.value) == f"{packed_file} is truncated inside its header"


def test_header_that_is_not_json_is_named_by_both_readers(packed_file):
    data = bytearray(packed_file.read_bytes())
    data[PREAMBLE.size] = 0xFF  # not UTF-8
    body = bytes(data[:-CHECKSUM_BYTES])
    packed_file.write_bytes(body + hashlib.sha256(body).digest())
    for read in (read_packed, read_header):
        with pytest.raises(ValueError) as error:
            read(packed_file)
        assert str(error.value).startswith(f"{packed_file}: its header is not UTF-8 JSON ("), read.__name__


@pytest.mark.parametrize("coord_bits", [32, 16])
def test_export_report_counts_every_byte_of_the_file(tmp_path, coord_bits):
    model = scaled()
    path = tmp_path / "m.alq"
    report = export_packed(model, path, coord_bits)
    data = path.read_bytes()
    (header_length,) = struct.unpack_from("<I", data, 10)
    header = json.loads(data[22:22 + header_length])
    # fc: 10 groups of 8, out: 3 groups of 10, 3 slots each; floats: fc.bias 10, out.bias 3, scale 2x5 (float32)
    live = {entry["name"]: entry["live_slots"] for entry in header["layers"]}
    quantized = sum(-(-groups * 3 // 8) + -(-live[name] * size // 8) + live[name] * coord_bits // 8
                    for name, groups, size in (("fc", 10, 8), ("out", 3, 10)))
    assert report == ExportReport(str(path), coord_bits, bit_summary(model).avg_bits, quantized, 4 * (10 + 3 + 10),
                                  22 + header_length, 32, len(data), len(data))
    assert str(report) == (f"{path}: {len(data)} bytes = quantized layers {quantized} + float remainder 92 + header "
                           f"{22 + header_length} + checksum 32 ({report.avg_bits:.4f} avg bits, {coord_bits}-bit "
                           f"coords)")


@pytest.mark.parametrize("model,message", [
    (lambda: Scaled(extra=True), "the model's tensor 'extra' is not in the file"),
    (lambda: Scaled((5, 2)), "tensor 'scale' is (5, 2) in the model, (2, 5) in the file"),
    (lambda: Scaled((10,)), "tensor 'scale' is (10,) in the model, (2, 5) in the file"),
])
def test_float_tensors_of_another_model_are_named(packed_file, model, message):
    target = model()
    with pytest.raises(ValueError) as error:
        load_packed(packed_file, target)
    assert str(error.value) == message
    assert find_layers(target) == {}


def test_file_with_one_quantized_layer_loads_into_a_bare_model(tmp_path):
    source = scaled(include=("out",))
    export_packed(source, tmp_path / "m.alq")
    target = load_packed(tmp_path / "m.alq", Scaled())
    assert list(find_layers(target)) == ["out"]
    assert all(torch.equal(target.state_dict()[key], value) for key, value in source.state_dict().items())
    x = torch.randn(4, 8)
    assert torch.equal(target(x), source(x))


def test_loading_does_not_depend_on_torchs_default_device(packed_file):
    """Decoded tensors are made where the file's bytes are (the CPU), whatever torch's default device (a script
    may set a GPU with ``torch.set_default_device``; here the meta device, which holds no data, stands in)."""
    source, target, inference = scaled(), Scaled(), Scaled()
    x = torch.randn(4, 8)
    with torch.device("meta"):
        load_packed(packed_file, target)
        packed = load_packed_for_inference(packed_file, inference)
        with torch.no_grad():
            out = packed(x)
    assert all(torch.equal(target.state_dict()[key], value) for key, value in source.state_dict().items())
    assert out.device.type == "cpu" and torch.equal(out, source(x).detach())


def test_export_refuses_a_big_endian_host(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "byteorder", "big")
    with pytest.raises(RuntimeError) as error:
        export_packed(scaled(), tmp_path / "m.alq")
    assert str(error.value) == "packed files need a little-endian host, this one is big-endian"
    assert not (tmp_path / "m.alq").exists()


@pytest.mark.parametrize("count", [9, 12, 16, 17])
def test_unpack_bits_refuses_more_bits_than_the_bytes_hold(count):
    packed = torch.tensor([0b10110101, 0xFF], dtype=torch.uint8)
    if count <= 16:
        bits = unpack_bits(packed, count)
        assert bits.tolist() == [bool(int(b)) for b in "10101101" + "11111111"][:count]
    else:
        with pytest.raises(ValueError) as error:
            unpack_bits(packed, count)
        assert str(error.value) == "2 bytes hold fewer than 17 bits"
    with pytest.raises(ValueError, match=r"^1 bytes hold fewer than 9 bits$"):
        unpack_bits(packed[:1], 9)


def test_bits_are_packed_least_significant_first_on_the_inputs_device():
    """The format's bit order, and the device kept (shapes and dtypes checked on the meta device, which runs
    no kernel: a helper that made a tensor on another device would fail there)."""
    flags = torch.tensor([[1, 0, 1, 0, 1], [1, 0, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert pack_bits(flags).tolist() == [0b10110101, 0b00011101]  # bits 0-7, then bits 8-14 and one zero
    for flags_on in (flags, flags.to("meta")):
        packed = pack_bits(flags_on)
        bits = unpack_bits(packed, 15)
        assert (packed.device, packed.dtype, tuple(packed.shape)) == (flags_on.device, torch.uint8, (2,))
        assert (bits.device, bits.dtype, tuple(bits.shape)) == (flags_on.device, torch.bool, (15,))
    assert torch.equal(unpack_bits(pack_bits(flags), 15), flags.reshape(-1))


def test_tensor_from_bytes_reads_little_endian_values():
    raw = torch.tensor(list(struct.pack("<6e", 1.0, -2.0, 0.5, 65504.0, -0.0, 3.0)), dtype=torch.uint8)
    tensor = tensor_from_bytes(raw, torch.float16, (2, 3))
    assert tensor.dtype == torch.float16 and tensor.shape == (2, 3)
    assert tensor.tolist() == [[1.0, -2.0, 0.5], [65504.0, -0.0, 3.0]]
    assert tensor_bytes(tensor) == bytes(raw.tolist())
    raw.zero_()
    assert tensor.tolist() == [[1.0, -2.0, 0.5], [65504.0, -0.0, 3.0]], "a new tensor, not a view of the bytes"
