"""Bit-packed export: round trips, size accounting, verification, atomic writes and the command lines."""
from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import alq_lightning.files as files_module
from alq_lightning.core import slot_bits
from alq_lightning.layers import LayerSelection, attach, find_layers
from alq_lightning.models import LeNet5, paper_structures
from alq_lightning.module import ClassifierModule
from alq_lightning.network import MultiBitNetwork
from alq_lightning.packed.cli import export_main, summary_main
from alq_lightning.packed.format import FORMAT_VERSION
from alq_lightning.packed.io import export_packed, load_packed, packed_summary, read_header
from alq_lightning.summary import bit_summary

from quantized_models import lenet, quantized, sample, small_cnn


def states(model: nn.Module) -> dict[str, tuple[torch.Tensor, ...]]:
    return {name: (layer.state.codes, layer.state.coords, layer.state.mask)
            for name, layer in find_layers(model).items()}


def rounded_to_half(model: nn.Module) -> nn.Module:
    """``model`` with every coordinate rounded to float16 and ŵ rewritten."""
    for layer in find_layers(model).values():
        layer.state.coords.copy_(layer.state.coords.half().float())
        layer.write_weight()
    return model


@pytest.mark.parametrize("coord_bits", [32, 16])
@pytest.mark.parametrize("build", [small_cnn, lenet], ids=["small_cnn", "lenet5"])
@pytest.mark.parametrize("attached", [False, True], ids=["bare", "attached"])
def test_round_trip(tmp_path, build, coord_bits, attached):
    source = quantized(build)
    assert any(bool((~layer.state.mask).all(dim=1).any()) for layer in find_layers(source).values())
    export_packed(source, tmp_path / "m.alq", coord_bits)
    target = quantized(build, seed=5, max_bits=4) if attached else build().eval()
    for layer in find_layers(target).values():
        layer.buffer("coord_vmax").fill_(1.0)
    assert load_packed(tmp_path / "m.alq", target) is target
    if coord_bits == 16:
        source = rounded_to_half(source)
    for name, (codes, coords, mask) in states(source).items():
        loaded = states(target)[name]
        assert torch.equal(loaded[0], codes) and torch.equal(loaded[1], coords) and torch.equal(loaded[2], mask)
        assert not find_layers(target)[name].buffer("coord_vmax").any()
    x = sample(build)
    assert torch.equal(target(x), source(x))
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor), key


def test_dead_slots_are_canonical_after_load(tmp_path):
    source = quantized(lenet)
    for layer in find_layers(source).values():
        state = layer.state
        state.coords.masked_fill_(~state.mask, 0.5)
        state.codes.bitwise_and_((~slot_bits(~state.mask)).to(torch.uint8)[:, None])
        assert bool((state.bases[~state.mask] == -1).all())
    export_packed(source, tmp_path / "m.alq")
    target = load_packed(tmp_path / "m.alq", lenet())
    for name, layer in find_layers(target).items():
        state, dead = layer.state, ~layer.state.mask
        assert not state.coords[dead].any()
        assert bool(((state.bases == 1) | ~dead[:, :, None]).all())
        assert torch.equal(state.reconstruct(), find_layers(source)[name].state.reconstruct())
    x = sample(lenet)
    assert torch.equal(target(x), source(x))


# (num_groups, group_size) of LeNet5's layers under the automatic layouts (the table in core/layout.py)
LENET_GROUPS = {"conv1": (20, 25), "conv2": (50 * 25, 20), "fc1": (500, 800), "fc2": (10, 500)}


@pytest.mark.parametrize("coord_bits", [32, 16])
@pytest.mark.parametrize("keep", [1.0, 0.1])
def test_size_matches_accounting(tmp_path, coord_bits, keep):
    """Size on disk = 22-byte preamble + header length (read from the file) + per layer ceil(G·K/8) + ceil(L·n/8)
    + L·coord bytes (G, n from LeNet5's layouts, L counted in the masks) + float32 biases + 32-byte checksum;
    ``bit_summary`` and the report give those layer bytes; the header's summary equals the model's."""
    model = quantized(lenet, keep=keep)
    layer_bytes = 0
    for name, layer in find_layers(model).items():
        (groups, size), mask = LENET_GROUPS[name], layer.state.mask
        assert tuple(mask.shape) == (groups, 4) and layer.state.codes.shape[1] == size, name
        live = int(mask.sum())
        layer_bytes += math.ceil(groups * 4 / 8) + math.ceil(live * size / 8) + live * coord_bits // 8
    bias_bytes = sum(4 * p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    summary = bit_summary(model, coord_bits)
    report = export_packed(model, tmp_path / "m.alq", coord_bits)
    (header_length,) = struct.unpack_from("<I", (tmp_path / "m.alq").read_bytes(), 10)
    assert os.path.getsize(tmp_path / "m.alq") == 22 + header_length + layer_bytes + bias_bytes + 32
    assert summary.storage_bytes == report.quantized_bytes == layer_bytes
    assert report.float_bytes == bias_bytes and report.header_bytes == 22 + header_length
    from_header = packed_summary(read_header(tmp_path / "m.alq"))
    assert from_header.storage_bytes == summary.storage_bytes
    assert from_header.table() == summary.table()


def test_corruption_is_detected(tmp_path):
    path = tmp_path / "m.alq"
    export_packed(quantized(lenet), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted.*checksum"):
        load_packed(path, lenet())


@pytest.mark.parametrize("keep_bytes", [5, 15, 200, -1])
def test_truncation_is_detected(tmp_path, keep_bytes):
    path = tmp_path / "m.alq"
    export_packed(quantized(lenet), path)
    path.write_bytes(path.read_bytes()[:keep_bytes])
    with pytest.raises(ValueError, match="bad magic" if 0 <= keep_bytes < 10 else "truncated"):
        load_packed(path, lenet())


def test_newer_version_is_refused(tmp_path):
    path = tmp_path / "m.alq"
    export_packed(quantized(lenet), path)
    data = bytearray(path.read_bytes())
    data[8:10] = (FORMAT_VERSION + 1).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"version {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}"):
        load_packed(path, lenet())


def test_not_a_packed_file(tmp_path):
    path = tmp_path / "m.alq"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not an ALQ packed file"):
        load_packed(path, lenet())


@pytest.mark.parametrize("wrong, message", [
    (lambda: LeNet5(1, 12, 28), "fc2.*\\(12, 500\\).*\\(10, 500\\)"),
    (lambda: LeNet5(3, 10, 28), "conv1"),
    (small_cnn, "'conv1' of the file is missing"),
    (lambda: quantized(lenet, seed=3, max_bits=5), "'conv1' is attached as kernelwise with mask \\(20, 5\\)"),
])
def test_wrong_model_is_refused_untouched(tmp_path, wrong, message):
    path = tmp_path / "m.alq"
    export_packed(quantized(lenet), path)
    model = wrong()
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    layers_before = set(find_layers(model))
    with pytest.raises(ValueError, match=message):
        load_packed(path, model)
    assert set(find_layers(model)) == layers_before
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in before.items())


def test_float_tensor_mismatch_is_named(tmp_path):
    path = tmp_path / "m.alq"
    export_packed(quantized(small_cnn), path)
    model = small_cnn()
    model[4] = nn.BatchNorm2d(16, affine=False)
    with pytest.raises(ValueError, match="file's tensor '4.weight' is not in the model"):
        load_packed(path, model)


def test_model_layer_quantized_but_float_in_file(tmp_path):
    torch.manual_seed(0)
    source = lenet()
    MultiBitNetwork(*attach(source, LayerSelection(max_bits=3, exclude=["fc2"]))).initialize()
    export_packed(source, tmp_path / "m.alq")
    with pytest.raises(ValueError, match="'fc2' of the model carries multi-bit state"):
        load_packed(tmp_path / "m.alq", quantized(lenet, max_bits=3))
    target = load_packed(tmp_path / "m.alq", lenet())
    x = sample(lenet)
    assert set(find_layers(target)) == {"conv1", "conv2", "fc1"} and torch.equal(target(x), source(x))


def failing_fsync(descriptor):
    raise OSError("disk full")


def test_atomic_write(tmp_path, monkeypatch):
    model = quantized(lenet)
    monkeypatch.setattr(files_module.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        export_packed(model, tmp_path / "new.alq")
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old.alq"
    old.write_bytes(b"previous contents")
    with pytest.raises(OSError, match="disk full"):
        export_packed(model, old)
    assert old.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["old.alq"]


def test_float16_overflow_is_refused(tmp_path):
    model = quantized(lenet)
    layer = find_layers(model)["fc2"]
    group, slot = layer.state.mask.nonzero()[0].tolist()
    layer.state.coords[group, slot] = 1e6
    with pytest.raises(ValueError, match="'fc2'.*float16.*coord_bits=32"):
        export_packed(model, tmp_path / "m.alq", coord_bits=16)
    assert not (tmp_path / "m.alq").exists()


def nan_bias(model: nn.Module) -> None:
    model.conv2.bias.data[3] = float("nan")


def inf_coordinate(model: nn.Module) -> None:
    """An infinite live coordinate of fc1, ŵ not rewritten (the coordinates are what the file holds)."""
    layer = find_layers(model)["fc1"]
    group, slot = layer.state.mask.nonzero()[0].tolist()
    layer.state.coords[group, slot] = float("inf")


def nan_weight(model: nn.Module) -> None:
    """A NaN coordinate of conv2 with ŵ rewritten: the weight is the first non-finite tensor."""
    layer = find_layers(model)["conv2"]
    layer.state.coords[layer.state.mask] = float("nan")
    layer.write_weight()


@pytest.mark.parametrize("coord_bits", [32, 16])
@pytest.mark.parametrize("break_model,name", [
    (nan_bias, "parameter 'conv2.bias'"),
    (inf_coordinate, "coordinates of layer 'fc1'"),
    (nan_weight, "parameter 'conv2.weight'"),
], ids=["float parameter", "coordinate", "quantized weight"])
def test_a_model_that_is_not_finite_is_refused_and_no_file_is_written(tmp_path, break_model, name, coord_bits):
    """A NaN float parameter used to be written as it is; a non-finite coordinate was blamed on float16."""
    model = quantized(lenet)
    break_model(model)
    with pytest.raises(ValueError) as error:
        export_packed(model, tmp_path / "m.alq", coord_bits=coord_bits)
    assert str(error.value) == f"{name} of the model is not finite: a packed file holds only finite weights"
    assert list(tmp_path.iterdir()) == []


def test_export_needs_multibit_layers(tmp_path):
    with pytest.raises(ValueError, match="no multi-bit layer"):
        export_packed(lenet(), tmp_path / "m.alq")


def write_checkpoint(path: Path) -> ClassifierModule:
    """A checkpoint laid out as Lightning + ALQInit write it, with the paper's LeNet5 structures."""
    torch.manual_seed(0)
    module = ClassifierModule(LeNet5(1, 10, 28), num_classes=10).eval()
    structures = {f"model.{name}": s for name, s in paper_structures("lenet5", module.model).items()}
    network = MultiBitNetwork(*attach(module, LayerSelection(max_bits=3, structures=structures)))
    network.initialize()
    torch.save({"state_dict": module.state_dict(), "alq": network.state_tensors(),
                "hyper_parameters": dict(module.hparams)}, path)
    return module


def test_export_command_line(tmp_path, capsys):
    module = write_checkpoint(tmp_path / "run.ckpt")
    out = tmp_path / "run.alq"
    assert export_main([str(tmp_path / "run.ckpt"), str(out), "--coord-bits", "16"]) == 1
    assert "--model --in-channels --input-size" in capsys.readouterr().err
    args = ["--model", "lenet5", "--in-channels", "1", "--input-size", "28", "--coord-bits", "16"]
    assert export_main([str(tmp_path / "run.ckpt"), str(out), *args]) == 0
    printed = capsys.readouterr().out
    assert "kernelwise" in printed and "subchannelwise(2)" in printed and f"{os.path.getsize(out)} bytes" in printed
    target = load_packed(out, lenet())
    reference = rounded_to_half(module.model)
    x = sample(lenet)
    assert torch.equal(target(x), reference(x))
    assert summary_main([str(out)]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in ("conv1", "conv2", "fc1", "fc2", "avg bits", "16-bit coords"))
    assert summary_main([str(tmp_path / "run.ckpt")]) == 1
    assert "not an ALQ packed file" in capsys.readouterr().err


@pytest.mark.slow
def test_commands_run_under_python_m(tmp_path):
    write_checkpoint(tmp_path / "run.ckpt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "alq_lightning", "export", str(tmp_path / "run.ckpt"), str(tmp_path / "run.alq"),
               "--model", "lenet5", "--in-channels", "1", "--input-size", "28"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "alq_lightning", "summary", str(tmp_path / "run.alq")],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "fc1" in done.stdout and "32-bit coords" in done.stdout
