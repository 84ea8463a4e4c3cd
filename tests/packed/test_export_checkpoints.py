"""``python -m alq_lightning export`` on the checkpoints users have: where the architecture comes from, which
files are refused and with what message, partial or mismatching state dicts, layers left in float, per-layer
bit widths, half-precision models, other prefixes; and the command line's own options."""
from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.serialization
from torch import nn

from alq_lightning.core import MultiBitState
from alq_lightning.layers import LayerSelection, attach, find_layers
from alq_lightning.models import LeNet5
from alq_lightning.network import MultiBitNetwork
from alq_lightning.packed.checkpoint import (
    architecture,
    attach_tensors,
    candidate_layouts,
    infer_structure,
    model_from_checkpoint,
    read_checkpoint,
)
from alq_lightning.packed.cli import export_main
from alq_lightning.packed.format import CHECKSUM_BYTES, PREAMBLE
from alq_lightning.packed.io import export_packed, load_packed, packed_summary, read_packed

# LeNet5 for 16x16 inputs: fc1 has 50 inputs, so the model is small.
ARCH = {"name": "lenet5", "in_channels": 1, "num_classes": 10, "input_size": 16}
KWARGS = {"in_channels": 1, "num_classes": 10, "input_size": 16}
FLAGS = ["--model", "lenet5", "--in-channels", "1", "--num-classes", "10", "--input-size", "16"]
MODELS = "lenet5, vgg_small, resnet20, resnet18, resnet34, vit_tiny"


def trained(selection: LayerSelection | None = None, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A LeNet5 (16x16 inputs) with ALQ attached and initialised, a few slots pruned in every layer."""
    torch.manual_seed(seed)
    model = LeNet5(1, 10, 16).to(dtype).eval()
    network = MultiBitNetwork(*attach(model, selection or LayerSelection(max_bits=3)))
    network.initialize()
    network.clear_slots({name: torch.rand(layer.state.mask.shape) < 0.3 for name, layer in network.layers.items()})
    return model


def checkpoint_of(model: nn.Module, prefix: str = "model.", **extra) -> dict:
    """What Lightning + ALQInit save for a LightningModule holding ``model`` under ``prefix``."""
    network = MultiBitNetwork(find_layers(model), {})
    return {"state_dict": {prefix + key: value for key, value in model.state_dict().items()},
            "alq": {prefix + name: tensors for name, tensors in network.state_tensors().items()}, **extra}


def save(path: Path, model: nn.Module, prefix: str = "model.", **extra) -> Path:
    torch.save(checkpoint_of(model, prefix, **extra), path)
    return path


def assert_same_model(loaded: nn.Module, model: nn.Module) -> None:
    expected = model.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for key, value in loaded.state_dict().items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key


# ---------------------------------------------------------------------------------------------- architecture

@pytest.mark.parametrize("hparams,given,expected", [
    ({"architecture": ARCH}, {}, ("lenet5", KWARGS)),
    ({"model": ARCH}, {}, ("lenet5", KWARGS)),
    ({"model_name": "lenet5", **KWARGS}, {}, ("lenet5", KWARGS)),
    ({"model": "lenet5", **KWARGS}, {}, ("lenet5", KWARGS)),
    ({"model_name": "vgg_small", "model": "lenet5", **KWARGS}, {}, ("vgg_small", KWARGS)),
    ({"architecture": ARCH, "model_name": "vgg_small", "in_channels": 3}, {}, ("lenet5", KWARGS)),
    ({"architecture": ARCH}, {"num_classes": 5, "input_size": "20"},
     ("lenet5", {"in_channels": 1, "num_classes": 5, "input_size": 20})),
    ({}, {"model": "lenet5", "in_channels": "1", "num_classes": "10", "input_size": "16"}, ("lenet5", KWARGS)),
], ids=["architecture", "model mapping", "model_name", "model string", "model_name before model", "mapping first",
        "given values win", "all given"])
def test_architecture_comes_from_the_given_values_then_the_hyper_parameters(hparams, given, expected):
    name, kwargs = architecture(hparams, **given)
    assert (name, kwargs) == expected
    assert all(type(value) is int for value in kwargs.values())


@pytest.mark.parametrize("hparams,missing", [
    ({}, "--model --in-channels --num-classes --input-size"),
    ({"num_classes": 10, "model_name": "lenet5"}, "--in-channels --input-size"),
    ({"architecture": {"name": "lenet5", "input_size": 16}}, "--in-channels --num-classes"),
])
def test_missing_architecture_names_the_flags_to_pass(hparams, missing):
    with pytest.raises(ValueError) as error:
        architecture(hparams)
    assert str(error.value) == ("the checkpoint's hyper-parameters do not give the model architecture; "
                                f"pass {missing} (models: {MODELS})")


# ---------------------------------------------------------------------------------------------- read_checkpoint

def test_files_that_are_not_lightning_checkpoints_are_named(tmp_path):
    export_packed(trained(), tmp_path / "m.alq")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "dict.pt")
    expected = {
        "m.alq": "is an ALQ packed file (what this command writes), not a Lightning checkpoint: give the .ckpt "
                 "written by training with ALQ attached",
        "notes.txt": "is not a checkpoint: expected a Lightning .ckpt, which torch.save writes as a zip archive; "
                     "this file is not one",
        "list.pt": "is not a Lightning checkpoint: it holds no 'state_dict' (expected the .ckpt written by training "
                   "with ALQ attached)",
        "dict.pt": "is not a Lightning checkpoint: it holds no 'state_dict' (expected the .ckpt written by training "
                   "with ALQ attached)",
    }
    for name, message in expected.items():
        with pytest.raises(ValueError) as error:
            read_checkpoint(str(tmp_path / name))
        assert str(error.value) == f"{tmp_path / name} {message}"


UNSAFE_REASON = re.compile(r"WeightsUnpickler error: Unsupported global: GLOBAL argparse\.Namespace[^\n]*")


@pytest.mark.parametrize("force_unsafe_default", [False, True])
def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path, monkeypatch, force_unsafe_default):
    """Old Lightning versions pickled ``argparse.Namespace`` hyper-parameters: loading them would run arbitrary
    pickled code, so they are refused with torch's reason, even where the environment makes torch default to
    unsafe loading."""
    path = tmp_path / "old.ckpt"
    save(path, trained(), hyper_parameters=argparse.Namespace(**ARCH))
    if force_unsafe_default:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError) as error:
        read_checkpoint(str(path))
    prefix = f"{path} is a torch file that cannot be read safely (weights_only=True): "
    message = str(error.value)
    assert message.startswith(prefix) and UNSAFE_REASON.fullmatch(message[len(prefix):]), message


@pytest.mark.parametrize("text,reason", [
    ("Weights only load failed.\n\t(1) retry\n\tWeightsUnpickler error: Unsupported global: GLOBAL x.Y here\n\nDocs",
     "WeightsUnpickler error: Unsupported global: GLOBAL x.Y here"),
    ("PytorchStreamReader failed reading zip archive: failed finding central directory\nsecond line",
     "PytorchStreamReader failed reading zip archive: failed finding central directory"),
    ("", ""),
], ids=["unpickler line", "first line", "empty"])
@pytest.mark.parametrize("kind", [pickle.UnpicklingError, RuntimeError])
def test_unreadable_checkpoint_reports_the_line_that_says_why(tmp_path, monkeypatch, text, reason, kind):
    path = save(tmp_path / "run.ckpt", trained())

    def failing_load(*args, **kwargs):
        raise kind(text)

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(ValueError) as error:
        read_checkpoint(str(path))
    assert str(error.value) == f"{path} is a torch file that cannot be read safely (weights_only=True): {reason}"


def test_checkpoint_saved_on_a_gpu_is_read_on_the_cpu(tmp_path, monkeypatch):
    """A checkpoint whose tensors were on ``cuda:0`` when saved loads onto the CPU of a machine without one."""
    model = trained()
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        path = save(tmp_path / "gpu.ckpt", model, hyper_parameters={"architecture": ARCH})
    checkpoint = read_checkpoint(str(path))
    assert all(value.device.type == "cpu" for value in checkpoint["state_dict"].values())
    assert export_main([str(path), str(tmp_path / "gpu.alq")]) == 0
    assert_same_model(load_packed(tmp_path / "gpu.alq", LeNet5(1, 10, 16)), model)


# ---------------------------------------------------------------------------------------------- model_from_checkpoint

def test_model_from_a_checkpoint_under_the_default_prefix():
    model = trained()
    rebuilt = model_from_checkpoint(checkpoint_of(model, hyper_parameters={"architecture": ARCH}))
    assert_same_model(rebuilt, model)
    assert {name: layer.layout.describe() for name, layer in find_layers(rebuilt).items()} == {
        "conv1": "kernelwise", "conv2": "pixelwise", "fc1": "subchannelwise(1)", "fc2": "subchannelwise(1)"}
    for name, layer in find_layers(model).items():
        state, loaded = layer.state, find_layers(rebuilt)[name].state
        assert all(torch.equal(a, b) for a, b in zip((state.codes, state.coords, state.mask),
                                                     (loaded.codes, loaded.coords, loaded.mask))), name


def test_checkpoint_without_hyper_parameters_needs_the_flags(tmp_path, capsys):
    model = trained()
    path = save(tmp_path / "bare.ckpt", model)
    assert export_main([str(path), str(tmp_path / "m.alq"), "--model", "lenet5", "--in-channels", "1"]) == 1
    assert capsys.readouterr().err == ("error: the checkpoint's hyper-parameters do not give the model architecture; "
                                       f"pass --num-classes --input-size (models: {MODELS})\n")
    assert export_main([str(path), str(tmp_path / "m.alq"), *FLAGS]) == 0
    assert_same_model(load_packed(tmp_path / "m.alq", LeNet5(1, 10, 16)), model)


def test_model_under_another_prefix(tmp_path, capsys):
    model = trained()
    path = save(tmp_path / "run.ckpt", model, prefix="net.", hyper_parameters={"architecture": ARCH})
    assert export_main([str(path), str(tmp_path / "m.alq")]) == 1
    assert capsys.readouterr().err.startswith("error: the checkpoint's state_dict under 'model.' does not fit lenet5 ")
    assert export_main([str(path), str(tmp_path / "m.alq"), "--prefix", "net."]) == 0
    assert_same_model(load_packed(tmp_path / "m.alq", LeNet5(1, 10, 16)), model)


def drop(key: str):
    return lambda checkpoint: checkpoint["state_dict"].pop(key)


def add(key: str):
    return lambda checkpoint: checkpoint["state_dict"].__setitem__(key, torch.zeros(3))


@pytest.mark.parametrize("edit,detail", [
    (drop("model.fc2.bias"), 'Missing key(s) in state_dict: "fc2.bias"'),
    (add("model.fc3.weight"), 'Unexpected key(s) in state_dict: "fc3.weight"'),
    (lambda checkpoint: checkpoint.pop("state_dict"), 'Missing key(s) in state_dict: "conv1.weight", "conv1.bias"'),
], ids=["missing key", "unexpected key", "no state_dict"])
def test_state_dict_must_fit_the_model_exactly(edit, detail):
    checkpoint = checkpoint_of(trained(), hyper_parameters={"architecture": ARCH})
    edit(checkpoint)
    with pytest.raises(ValueError) as error:
        model_from_checkpoint(checkpoint)
    message = str(error.value)
    assert message.startswith("the checkpoint's state_dict under 'model.' does not fit lenet5 {'in_channels': 1, "
                              "'num_classes': 10, 'input_size': 16}: Error(s) in loading state_dict for LeNet5:")
    assert detail in message


@pytest.mark.parametrize("edit,message", [
    (lambda checkpoint: checkpoint.pop("alq"),
     "the checkpoint holds no multi-bit tensors under 'alq' for layers under 'model.'"),
    (lambda checkpoint: checkpoint.__setitem__("alq", {"other." + k[6:]: v for k, v in checkpoint["alq"].items()}),
     "the checkpoint holds no multi-bit tensors under 'alq' for layers under 'model.'"),
    (lambda checkpoint: checkpoint["alq"].__setitem__("model.pool", checkpoint["alq"]["model.fc2"]),
     "multi-bit layer 'pool' of the checkpoint is not a weight parameter of the model"),
    (lambda checkpoint: checkpoint["alq"]["model.fc1"].__setitem__("coords", checkpoint["alq"]["model.fc1"]["coords"]
                                                                   * 2),
     "the multi-bit tensors of layer 'fc1' (codes (500, 50)) do not reproduce its dense weight (500, 50) under any "
     "structure"),
    (lambda checkpoint: checkpoint["alq"].__setitem__("model.fc1", checkpoint["alq"]["model.fc2"]),
     "the multi-bit tensors of layer 'fc1' (codes (10, 500)) do not reproduce its dense weight (500, 50) under any "
     "structure"),
], ids=["no alq", "alq under another prefix", "not a weight", "wrong coordinates", "another layer's tensors"])
def test_multibit_tensors_that_do_not_fit_are_named(edit, message):
    checkpoint = checkpoint_of(trained(), hyper_parameters={"architecture": ARCH})
    edit(checkpoint)
    with pytest.raises(ValueError) as error:
        model_from_checkpoint(checkpoint)
    assert str(error.value) == message


def test_layers_left_in_float_stay_in_float(tmp_path):
    model = trained(LayerSelection(max_bits=3, exclude=["fc2"]))
    path = save(tmp_path / "run.ckpt", model, hyper_parameters={"architecture": ARCH})
    assert export_main([str(path), str(tmp_path / "m.alq")]) == 0
    header = read_packed(tmp_path / "m.alq").header
    assert [entry["name"] for entry in header["layers"]] == ["conv1", "conv2", "fc1"]
    assert [entry["name"] for entry in header["float"]] == ["conv1.bias", "conv2.bias", "fc1.bias", "fc2.weight",
                                                           "fc2.bias"]
    assert_same_model(load_packed(tmp_path / "m.alq", LeNet5(1, 10, 16)), model)


def test_each_layer_keeps_its_own_bit_width_and_structure(tmp_path):
    selection = LayerSelection(max_bits=2, max_bits_overrides={"conv1": 4, "fc1": 5},
                               structures={"conv2": "kernelwise", "fc1": "columnwise(1)", "fc2": "subchannelwise(4)"})
    model = trained(selection)
    path = save(tmp_path / "run.ckpt", model, hyper_parameters={"architecture": ARCH})
    rebuilt = model_from_checkpoint(read_checkpoint(str(path)))
    assert {name: (layer.layout.describe(), layer.state.max_bits) for name, layer in find_layers(rebuilt).items()} == {
        "conv1": ("kernelwise", 4), "conv2": ("kernelwise", 2), "fc1": ("columnwise(1)", 5),
        "fc2": ("subchannelwise(4)", 2)}
    assert_same_model(rebuilt, model)


def test_layer_with_more_slots_than_supported_is_refused(tmp_path, capsys):
    """Six more slots, dead (they change no weight), still make 9 slots per group: more than the 8 supported."""
    model = trained()
    checkpoint = checkpoint_of(model, hyper_parameters={"architecture": ARCH})
    tensors = checkpoint["alq"]["model.conv1"]
    for key in ("mask", "coords", "coord_m", "coord_v", "coord_vmax"):
        tensors[key] = torch.cat([tensors[key], tensors[key].new_zeros(20, 6)], dim=1)
    torch.save(checkpoint, tmp_path / "run.ckpt")
    assert export_main([str(tmp_path / "run.ckpt"), str(tmp_path / "m.alq")]) == 1
    assert capsys.readouterr().err == "error: max_bits=9 must be an integer in [1, 8]\n"
    assert not (tmp_path / "m.alq").exists()


def test_latent_weights_and_statistics_of_the_checkpoint_are_not_needed(tmp_path):
    model = trained()
    checkpoint = checkpoint_of(model, hyper_parameters={"architecture": ARCH})
    for tensors in checkpoint["alq"].values():
        for key in ("weight_m", "weight_v", "weight_vmax", "coord_m", "coord_v", "coord_vmax", "steps"):
            tensors.pop(key)
        tensors["latent"] = torch.ones(3, tensors["codes"].shape[1])
    rebuilt = model_from_checkpoint(checkpoint)
    assert_same_model(rebuilt, model)
    assert all(layer.buffer("latent").shape[0] == 0 for layer in find_layers(rebuilt).values())


# ---------------------------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("shape,group_size,expected", [
    ((6, 4), 2, ["subchannelwise(2)", "columnwise(3)"]),
    ((4, 6), 2, ["subchannelwise(3)", "columnwise(2)"]),
    ((4, 6), 4, ["columnwise(1)"]),
    ((4, 6), 5, []),
    ((3, 2, 3, 3), 9, ["kernelwise"]),
    ((3, 2, 3, 3), 18, ["channelwise"]),
    ((4, 2, 1, 2), 2, ["kernelwise", "pixelwise", "subchannelwise(1)"]),
    ((4, 6, 3), 3, ["kernelwise", "subchannelwise(1)"]),
    ((4, 6, 3), 6, ["pixelwise"]),
    ((2, 3, 4, 6), 3, ["pixelwise", "subchannelwise(2)"]),
], ids=lambda value: str(value))
def test_candidate_layouts_are_those_with_groups_of_that_size(shape, group_size, expected):
    assert [layout.describe() for layout in candidate_layouts(shape, group_size)] == expected


def state_in(structure: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
             seed: int = 0) -> tuple[torch.Tensor, MultiBitState]:
    """A weight of ``shape`` (under ``structure``) holding the reconstruction of a random multi-bit state."""
    torch.manual_seed(seed)
    layer = nn.Linear(1, 1) if len(shape) == 2 else nn.Conv2d(1, 1, 1)
    layer.weight = nn.Parameter(torch.randn(shape, dtype=dtype))
    network = MultiBitNetwork(*attach(layer, LayerSelection(max_bits=2, structures={"": structure})))
    network.initialize()
    found = find_layers(layer)[""]
    return layer.weight.detach().clone(), MultiBitState(found.state.codes.clone(), found.state.coords.clone(),
                                                        found.state.mask.clone())


@pytest.mark.parametrize("structure,shape", [
    ("pixelwise", (4, 2, 1, 2)), ("kernelwise", (4, 2, 1, 2)), ("channelwise", (3, 2, 2, 2)),
    ("subchannelwise(2)", (6, 4)), ("columnwise(3)", (6, 4)),
])
def test_structure_is_the_one_that_reproduces_the_weight(structure, shape):
    """Of several layouts with groups of the right size, the one whose reconstruction is the weight wins,
    whatever its name's place in the alphabet (kernelwise and subchannelwise(1) group a 1x2 kernel alike)."""
    weight, state = state_in(structure, shape)
    assert infer_structure("w", weight, state) == structure


@pytest.mark.parametrize("scale", [0.5, 100.0])
@pytest.mark.parametrize("factor,accepted", [(0.0, True), (0.5, True), (1.0, True), (1.5, False), (500.0, False)])
def test_dense_weight_may_differ_from_the_reconstruction_by_rounding_only(scale, factor, accepted):
    """Tolerance: 1e-5 of the largest weight, at least 1e-5. An element of a group whose slots are all pruned
    is exactly 0 in the reconstruction, so the difference there is exactly the one added (float64)."""
    _, state = state_in("subchannelwise(1)", (6, 4), torch.float64)
    state.mask[0] = False
    state.coords[0] = 0.0
    state = MultiBitState(state.codes, state.coords * (scale / float(state.reconstruct().abs().max())), state.mask)
    weight = state.reconstruct().reshape(6, 4).clone()
    assert not weight[0].any() and float(weight.abs().max()) == pytest.approx(scale)
    tolerance = 1e-5 * max(1.0, float(weight.abs().max()))
    weight[0, 0] = factor * tolerance
    if accepted:
        assert infer_structure("w", weight, state) == "subchannelwise(1)"
    else:
        with pytest.raises(ValueError, match=r"^the multi-bit tensors of layer 'w' \(codes \(6, 4\)\) do not "
                                             r"reproduce its dense weight \(6, 4\) under any structure$"):
            infer_structure("w", weight, state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weight_holds_the_rounded_reconstruction(dtype):
    """A weight in float16 or bfloat16 (its state in float32) holds ŵ rounded to its dtype: that is a match."""
    weight, state = state_in("subchannelwise(1)", (6, 16), dtype)
    assert weight.dtype == dtype and state.coords.dtype == torch.float32
    assert float((weight.float() - state.reconstruct()).abs().max()) > 1e-4 * float(weight.abs().max())
    assert infer_structure("w", weight, state) == "subchannelwise(1)"


def test_no_layout_with_groups_of_that_size():
    weight, state = state_in("subchannelwise(1)", (6, 4))
    with pytest.raises(ValueError, match=r"^the multi-bit tensors of layer 'fc' \(codes \(6, 4\)\) do not reproduce "
                                         r"its dense weight \(5, 5\) under any structure$"):
        infer_structure("fc", torch.zeros(5, 5), state)


def test_attach_tensors_names_the_layer_whose_tensors_do_not_fit():
    model = trained()
    tensors = MultiBitNetwork(find_layers(model), {}).state_tensors()
    tensors["fc2"]["coords"] = tensors["fc2"]["coords"] + 1.0
    fresh = LeNet5(1, 10, 16)
    fresh.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match=r"^the multi-bit tensors of layer 'fc2' \(codes \(10, 500\)\)"):
        attach_tensors(fresh, tensors)


# ---------------------------------------------------------------------------------------------- the command line

def test_command_line_prints_the_summary_and_the_file_it_wrote(tmp_path, capsys):
    model = trained()
    path = save(tmp_path / "run.ckpt", model, hyper_parameters={"architecture": ARCH})
    out = tmp_path / "m.alq"
    assert export_main([str(path), str(out), "--coord-bits", "16"]) == 0
    printed = capsys.readouterr().out
    data = out.read_bytes()
    _, _, header_length, file_size = PREAMBLE.unpack(data[:PREAMBLE.size])
    header = read_packed(out).header
    summary = packed_summary(header)
    assert file_size == len(data) == os.path.getsize(out)
    assert printed == (f"{summary}\n"
                       f"{out}: {file_size} bytes = quantized layers {header['quantized_bytes']} + float remainder "
                       f"{header['float_bytes']} + header {PREAMBLE.size + header_length} + checksum {CHECKSUM_BYTES} "
                       f"({summary.avg_bits:.4f} avg bits, 16-bit coords)\n")
    assert "(16-bit coords)" in str(summary) and header["coord_dtype"] == "float16"


def test_command_line_help(capsys):
    with pytest.raises(SystemExit) as done:
        export_main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m alq_lightning export [-h] [--coord-bits {16,32}] [--model "
                           "{lenet5,vgg_small,resnet20,resnet18,resnet34,vit_tiny}] [--in-channels IN_CHANNELS] "
                           "[--num-classes NUM_CLASSES] [--input-size INPUT_SIZE] [--prefix PREFIX] "
                           "[--module CLASS_PATH] checkpoint output ")
    assert (" checkpoint output Write a Lightning checkpoint's ALQ model as a bit-packed file. positional "
            "arguments: checkpoint Lightning checkpoint (.ckpt) written with ALQ attached, or the folder of a sharded "
            "(FSDP2) one output packed file to write (.alq) ") in text
    assert text.endswith(" --coord-bits {16,32} coordinate precision --model "
                         "{lenet5,vgg_small,resnet20,resnet18,resnet34,vit_tiny} architecture, when the "
                         "hyper-parameters lack it --in-channels IN_CHANNELS --num-classes NUM_CLASSES --input-size "
                         "INPUT_SIZE --prefix PREFIX state_dict prefix of the model inside the module --module "
                         "CLASS_PATH any LightningModule class (package.module.Class): the checkpoint is loaded with "
                         "its load_from_checkpoint and the whole module exported (--model and the sizes unused)")


@pytest.mark.parametrize("flags,message", [
    (["--coord-bits", "8"], "argument --coord-bits: invalid choice: 8 (choose from 16, 32)"),
    (["--coord-bits", "33"], "argument --coord-bits: invalid choice: 33 (choose from 16, 32)"),
    (["--model", "lenet"], "argument --model: invalid choice: 'lenet' (choose from {})"),
    (["--in-channels", "one"], "argument --in-channels: invalid int value: 'one'"),
    (["--num-classes", "ten"], "argument --num-classes: invalid int value: 'ten'"),
    (["--input-size", "16.0"], "argument --input-size: invalid int value: '16.0'"),
])
def test_command_line_refuses_bad_options_before_reading_anything(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as done:
        export_main([str(tmp_path / "missing.ckpt"), str(tmp_path / "m.alq"), *flags])
    assert done.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: python -m alq_lightning export ")
    choices = (", ".join(f"'{name}'" for name in MODELS.split(", ")), MODELS)  # quoted before Python 3.12.8
    assert any(error.endswith(f"python -m alq_lightning export: error: {message.format(names)}\n") for names in choices)
    assert not (tmp_path / "m.alq").exists()


def test_missing_checkpoint_is_an_error_not_a_traceback(tmp_path, capsys):
    assert export_main([str(tmp_path / "missing.ckpt"), str(tmp_path / "m.alq")]) == 1
    assert capsys.readouterr().err == (f"error: [Errno 2] No such file or directory: "
                                       f"'{tmp_path / 'missing.ckpt'}'\n")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_checkpoint_trained_in_another_precision_exports_in_that_precision(tmp_path, dtype):
    """A run in ``16-true`` / ``bf16-true`` / ``64-true`` stores ŵ in that dtype: the model is rebuilt in it and
    the structures are recognised; a half-precision packed file (32-bit coordinates) loads back into the same
    weights."""
    model = trained(dtype=dtype)
    path = save(tmp_path / "run.ckpt", model, hyper_parameters={"architecture": ARCH})
    loaded = model_from_checkpoint(read_checkpoint(str(path)))
    assert_same_model(loaded, model)
    assert export_main([str(path), str(tmp_path / "model.alq")]) in (None, 0)
    if dtype == torch.float64:
        return
    restored = load_packed(str(tmp_path / "model.alq"), LeNet5(1, 10, 16).to(dtype))
    for key, value in restored.state_dict().items():
        assert value.dtype == dtype and torch.equal(value, model.state_dict()[key]), key
