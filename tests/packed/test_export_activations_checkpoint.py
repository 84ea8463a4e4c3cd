"""``alq-export`` of a checkpoint written by a real fit with ``ALQCallback(act_bits=...)``: the packed file carries
the input quantizers, and the model loaded from it computes as the trained model did."""
from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from alq_lightning import ALQCallback
from alq_lightning.callbacks.activations import CHECKPOINT_KEY
from alq_lightning.models import LeNet5
from alq_lightning.module import ClassifierModule
from alq_lightning.packed.checkpoint import model_from_checkpoint, read_checkpoint
from alq_lightning.packed.cli import export_main
from alq_lightning.packed.inference import load_packed_for_inference
from alq_lightning.packed.io import load_packed, read_header

ARCH = {"name": "lenet5", "in_channels": 1, "num_classes": 10, "input_size": 16}


def images(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    return TensorDataset(x, (x[:, 0, :8].mean((1, 2)) > 0).long() * 3 + (x[:, 0, :, :8].mean((1, 2)) > 0).long())


def fit(tmp_path) -> tuple[ClassifierModule, ALQCallback, str]:
    """A LeNet5 trained through a short ALQ schedule with 2-bit inputs from the STE stage on; its last checkpoint."""
    torch.manual_seed(0)
    module = ClassifierModule(LeNet5(1, 10, 16), num_classes=10, optimizer=partial(torch.optim.Adam, lr=1e-3),
                              architecture=ARCH)
    alq = ALQCallback(0.8, max_bits=3, rounds=1, basis_epochs=1, coordinate_epochs=1, ste_epochs=1,
                      final_coordinate_epochs=1, act_bits=2)
    trainer = L.Trainer(callbacks=[alq], max_epochs=alq.total_epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        deterministic=True)
    trainer.fit(module, DataLoader(images(), batch_size=16))
    path = str(tmp_path / "run.ckpt")
    trainer.save_checkpoint(path)
    return module, alq, path


def test_a_checkpoint_with_quantized_inputs_exports_them(tmp_path):
    """The checkpoint's ``alq_activations`` are restored by ``model_from_checkpoint``; ``alq-export`` writes a
    version-2 file whose quantizers equal the trained ones; ``load_packed`` and both packed-inference modes give
    the trained model's outputs (bitwise within float rounding)."""
    module, alq, path = fit(tmp_path)
    trained = {name.removeprefix("model."): layer for name, layer in alq.activations.layers.items()}
    assert set(trained) == {"conv2", "fc1", "fc2"} and all(layer.ready for layer in trained.values())
    rebuilt = model_from_checkpoint(read_checkpoint(path))
    for name, layer in trained.items():
        assert torch.equal(getattr(rebuilt, name).alq_act_coords, layer.module.alq_act_coords), name
    out = tmp_path / "model.alq"
    assert export_main([path, str(out)]) in (None, 0)
    header = read_header(out)
    entries = {entry["name"]: entry.get("activations") for entry in header["layers"]}
    assert entries["conv1"] is None
    for name, layer in trained.items():
        assert entries[name]["act_bits"] == 2 and entries[name]["signed"] == layer.signed
        assert torch.equal(torch.tensor(entries[name]["coords"]), layer.coords.reshape(-1)), name
    x = images(8, seed=1).tensors[0]
    module.eval()
    alq.activations._enable_fitted()
    with torch.no_grad():
        expected = module(x)
        assert torch.equal(load_packed(out, LeNet5(1, 10, 16).eval())(x), expected)
        assert torch.equal(load_packed_for_inference(out, lambda: LeNet5(1, 10, 16))(x), expected)
        bitwise = load_packed_for_inference(out, lambda: LeNet5(1, 10, 16), bitwise=True)
        assert bitwise.bitwise_layers == ["conv2", "fc1", "fc2"]
        torch.testing.assert_close(bitwise(x), expected, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_whose_quantizers_were_never_fitted_is_refused(tmp_path, capsys):
    """A checkpoint written before the inputs were first quantized (``ready`` False) exports nothing."""
    from test_export_checkpoints import checkpoint_of, trained

    checkpoint = checkpoint_of(trained(), hyper_parameters={"architecture": ARCH})
    checkpoint[CHECKPOINT_KEY] = {"model.conv2": {"coords": torch.zeros(1, 2, dtype=torch.int32),
                                                  "signed": torch.tensor(False), "ready": torch.tensor(False)}}
    torch.save(checkpoint, tmp_path / "early.ckpt")
    assert export_main([str(tmp_path / "early.ckpt"), str(tmp_path / "m.alq")]) == 1
    assert "input quantizer of layer 'conv2' is attached but not fitted (no training batch has fitted it)" in (
        capsys.readouterr().err)
    assert not (tmp_path / "m.alq").exists()
