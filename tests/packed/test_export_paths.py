"""The export's file handling and its command line's input: output paths, permissions, leftovers of killed
exports, and inputs that are not checkpoints."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alq_lightning.layers import LayerSelection, attach
from alq_lightning.models import LeNet5
from alq_lightning.module import ClassifierModule
from alq_lightning.network import MultiBitNetwork
from alq_lightning.packed.checkpoint import architecture
from alq_lightning.packed.cli import export_main
from alq_lightning.packed.io import export_packed, load_packed

from quantized_models import lenet, quantized


def write_checkpoint(path: Path, architecture: dict | None = None) -> ClassifierModule:
    """A checkpoint laid out as Lightning + ALQInit write it."""
    torch.manual_seed(0)
    module = ClassifierModule(LeNet5(1, 10, 28), num_classes=10, architecture=architecture).eval()
    network = MultiBitNetwork(*attach(module, LayerSelection(max_bits=3)))
    network.initialize()
    torch.save({"state_dict": module.state_dict(), "alq": network.state_tensors(),
                "hyper_parameters": dict(module.hparams)}, path)
    return module


def test_packed_file_mode_follows_the_umask(tmp_path, umask_027):
    export_packed(quantized(lenet), tmp_path / "m.alq")
    assert (tmp_path / "m.alq").stat().st_mode & 0o777 == umask_027


def test_temporary_file_of_a_killed_export_is_cleaned_up(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    writer.kill()
    writer.wait()
    stale = tmp_path / f".m.alq.{socket.gethostname()}.{writer.pid}.0123abcd.tmp"
    stale.write_bytes(b"half an export")
    export_packed(quantized(lenet), tmp_path / "m.alq")
    assert [p.name for p in tmp_path.iterdir()] == ["m.alq"]


@pytest.mark.parametrize("output,message", [
    ("missing/m.alq", "folder '{tmp}/missing' does not exist"),
    ("", "path='' is empty"),
    ("{tmp}", "path='{tmp}' names a folder"),
])
def test_bad_output_path_is_named(tmp_path, capsys, output, message):
    write_checkpoint(tmp_path / "run.ckpt")
    output = output.replace("{tmp}", str(tmp_path)) if output.startswith("{") else output
    output = str(tmp_path / output) if output.startswith("missing") else output
    args = [str(tmp_path / "run.ckpt"), output, "--model", "lenet5", "--in-channels", "1", "--input-size", "28"]
    assert export_main(args) == 1
    error = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in error and ".tmp" not in error
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]


def test_export_of_something_else_than_a_checkpoint_says_what_it_found(tmp_path, capsys):
    export_packed(quantized(lenet), tmp_path / "m.alq")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save(lenet().state_dict(), tmp_path / "weights.pt")
    for given, found in (("m.alq", "is an ALQ packed file (what this command writes), not a Lightning checkpoint"),
                         ("notes.txt", "is not a checkpoint: expected a Lightning .ckpt"),
                         ("weights.pt", "is not a Lightning checkpoint: it holds no 'state_dict'")):
        assert export_main([str(tmp_path / given), str(tmp_path / "out.alq")]) == 1
        error = capsys.readouterr().err
        assert f"{tmp_path / given} {found}" in error and "weights_only" not in error
    assert not (tmp_path / "out.alq").exists()


def test_readme_command_works_on_a_checkpoint_that_carries_its_architecture(tmp_path, capsys):
    architecture = {"name": "lenet5", "in_channels": 1, "num_classes": 10, "input_size": 28}
    module = write_checkpoint(tmp_path / "run.ckpt", architecture)
    assert torch.load(tmp_path / "run.ckpt", weights_only=True)["hyper_parameters"]["architecture"] == architecture
    assert export_main([str(tmp_path / "run.ckpt"), str(tmp_path / "model.alq"), "--model", "lenet5"]) == 0, \
        capsys.readouterr().err
    assert export_main([str(tmp_path / "run.ckpt"), str(tmp_path / "again.alq")]) == 0
    loaded = load_packed(tmp_path / "model.alq", lenet())
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in module.model.state_dict().items())


@pytest.mark.parametrize("architecture,message", [
    ({"in_channels": 1}, "must be None or a dict of build_model arguments with a 'name'"),
    ({"name": "lenet5", "width": {1: 2}}, "made of strings, numbers, None, lists and dicts with string keys"),
    ({"name": "lenet5", "act": torch.nn.ReLU}, "made of strings"),
    ({"name": "lenet5", "num_classes": 12}, "has num_classes=12, the module num_classes=10"),
])
def test_bad_architecture_is_refused(architecture, message):
    with pytest.raises(ValueError, match=message):
        ClassifierModule(LeNet5(1, 10, 28), num_classes=10, architecture=architecture)


def test_saved_architecture_carries_constructor_options():
    saved = {"architecture": {"name": "vgg_small", "in_channels": 3, "num_classes": 10, "input_size": 32,
                              "width": 0.25}}
    assert architecture(saved) == ("vgg_small", {"width": 0.25, "in_channels": 3, "num_classes": 10,
                                                 "input_size": 32})
    assert architecture(saved, model="lenet5", input_size=28)[1] == {"in_channels": 3, "num_classes": 10,
                                                                     "input_size": 28}
