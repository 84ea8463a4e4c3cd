"""Multi-bit activations through Lightning: when they start, what a quantized input holds, BOPs, checkpoints,
resume, DDP, and the model without the callback."""
from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from alq_lightning import ActivationQuantization, ALQCallback, bit_summary
from alq_lightning.core.activations import levels
from alq_lightning.data import SyntheticDataModule
from alq_lightning.data.tensor_loader import TensorLoader
from alq_lightning.module import ClassifierModule

from tiny import TinyModule, build, loader, make_data, small_cnn, trainer


def schedule(**kwargs) -> ALQCallback:
    return ALQCallback(0.8, max_bits=3, rounds=1, basis_epochs=1, coordinate_epochs=1, ste_epochs=2,
                       final_coordinate_epochs=1, **{"act_bits": 2, **kwargs})


class Inputs(Callback):
    """Per training epoch and layer: the distinct values of the layer's input in the epoch's last batch, and
    whether they all lie on the layer's levels."""

    def __init__(self, alq: ALQCallback) -> None:
        self.alq, self.seen = alq, {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.handles = []
        for name, layer in self.alq.network.layers.items():
            def look(module, args, output, name=name):
                layer = self.alq.activations.layers.get(name)
                coords = None if layer is None else layer.coords.clone()
                self.seen.setdefault(trainer.current_epoch, {})[name] = (args[0].detach().clone(), coords)
            self.handles.append(layer.module.register_forward_hook(look))

    def on_train_end(self, trainer, pl_module) -> None:
        for handle in self.handles:
            handle.remove()


def test_inputs_are_quantized_from_the_ste_stage_on_except_the_first_layers(caplog):
    alq = schedule(act_start="ste")
    inputs = Inputs(alq)
    with caplog.at_level("INFO"):
        trainer([alq, inputs], alq.total_epochs).fit(build("cnn"), loader())
    never = "{0,1} (inputs never negative)"
    assert caplog.text.count(f"input codes: net.3 {never}, net.6 {never}, net.10 {never}") == 1
    assert alq.activations.start_epoch == 3 and set(alq.activations.layers) == {"net.3", "net.6", "net.10"}
    for epoch, layers in inputs.seen.items():
        for name, (x, coords) in layers.items():
            distinct = x.unique().numel()
            if epoch < 3 or name == "net.0":
                assert distinct > 4, (epoch, name)
            else:
                assert not alq.activations.layers[name].signed, "inputs after a ReLU take the {0,1} codes"
                assert distinct <= 4 and bool(torch.isin(x.unique(), levels(coords, False)).all()), (epoch, name)


def test_inputs_are_quantized_from_the_first_alq_epoch_by_default_and_the_summary_counts_bops():
    alq = schedule()
    inputs = Inputs(alq)
    module = build("cnn")
    trainer([alq, inputs], alq.total_epochs).fit(module, loader())
    assert alq.activations.start_epoch == 0 and inputs.seen[0]["net.3"][0].unique().numel() <= 4
    summary = bit_summary(module)
    # 8x8 inputs, padding 1: every conv has 64 output positions; the Linear one
    positions = {"net.0": 64, "net.3": 64, "net.6": 64, "net.10": 1}
    rows = {row.name: row for row in summary.rows}
    assert {name: row.act_bits for name, row in rows.items()} == {"net.0": 0, "net.3": 2, "net.6": 2, "net.10": 2}
    layers = alq.network.layers
    assert summary.macs == sum(positions[n] * layers[n].param.numel() for n in positions if n != "net.0")
    assert summary.bops == sum(positions[n] * layers[n].bits.binary_bits * 2 for n in positions if n != "net.0")
    assert f"{summary.bops} BOPs and {summary.macs} float MACs per sample" in str(summary)
    assert summary.header[-2:] == ("act_bits", "BOPs")


def resumable_loader() -> TensorLoader:
    x, y = make_data("image").tensors
    return TensorLoader(x, y, 32, shuffle=True, seed=1)


def final_state(alq: ALQCallback) -> list[torch.Tensor]:
    weights = [t.clone() for layer in alq.network.layers.values() for t in (layer.state.codes, layer.state.coords)]
    return weights + [layer.coords.clone() for layer in alq.activations.layers.values()]


@pytest.mark.parametrize("step", [20, 30, 36])
def test_resume_with_activations_ends_exactly_like_an_uninterrupted_run(tmp_path, step):
    """8 steps per epoch; STE (and, with ``act_start="ste"``, quantized inputs) from step 24: checkpoints before,
    at and inside it."""
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    alq = schedule(act_start="ste")
    trainer([alq, saver], alq.total_epochs, enable_checkpointing=True).fit(build("cnn"), resumable_loader())
    reference = final_state(alq)
    assert set(torch.load(tmp_path / f"step={step}.ckpt", weights_only=True)["alq_activations"]) == {
        "net.3", "net.6", "net.10"}
    alq = schedule(act_start="ste")
    trainer([alq], alq.total_epochs).fit(build("cnn"), resumable_loader(), ckpt_path=tmp_path / f"step={step}.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(reference, final_state(alq)))


def test_without_the_callback_a_checkpoint_gives_the_float_activation_model(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    alq = schedule()
    module = build("cnn")
    fit = trainer([alq, saver], alq.total_epochs, enable_checkpointing=True)
    fit.fit(module, loader())
    x = make_data("image").tensors[0][:16]
    module.eval()
    with torch.no_grad():
        quantized = module(x)
        alq.activations._enable(False)
        float_inputs = module(x)
    plain = TinyModule.load_from_checkpoint(tmp_path / "last.ckpt", net=small_cnn()).eval()
    with torch.no_grad():
        assert torch.equal(plain(x), float_inputs) and not torch.allclose(plain(x), quantized)
    again = schedule()
    restored = build("cnn", seed=5)
    trainer([again], again.total_epochs).test(restored, loader(), ckpt_path=tmp_path / "last.ckpt", verbose=False)
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(x), quantized), "with the callback the inputs are quantized as when saved"


def test_activation_quantization_alone_quantizes_every_linear_and_conv_after_the_first():
    callback = ActivationQuantization(act_bits=3, start_epoch=1, per_channel=True)
    module = build("cnn")
    trainer([callback], 2).fit(module, loader())
    assert set(callback.layers) == {"net.3", "net.6", "net.10"}
    assert callback.layers["net.3"].coords.shape == (8, 3) and callback.layers["net.10"].coords.shape == (64, 3)
    assert all(layer.ready for layer in callback.layers.values())


@pytest.mark.parametrize(("arguments", "message"), [
    ({"act_bits": 0}, r"act_bits=0 is not allowed; expected an integer in \[1, 8\]"),
    ({"act_bits": 2.0}, r"act_bits=2.0 is not allowed"),
    ({"momentum": 1.0}, r"momentum=1.0 is not allowed; expected a number in \[0, 1\)"),
    ({"iterations": 0}, r"iterations=0 is not allowed; expected an integer >= 1"),
])
def test_bad_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        ActivationQuantization(**arguments)
    with pytest.raises(ValueError, match=r"act_start='late' is not allowed; expected one of \('ste', 'start'\)"):
        ALQCallback(act_bits=2, act_start="late")


class SaveActivations(Callback):
    def __init__(self, alq: ALQCallback, directory) -> None:
        self.alq, self.directory = alq, directory

    def on_train_end(self, trainer, pl_module) -> None:
        tensors = {name: layer.tensors() for name, layer in self.alq.activations.layers.items()}
        torch.save(tensors, self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ranks_end_with_identical_activation_coordinates(tmp_path):
    alq = schedule()
    data = SyntheticDataModule(num_classes=4, in_channels=1, input_size=8, train_size=256, val_size=0,
                               test_size=64, batch_size=32)
    trainer([alq, SaveActivations(alq, tmp_path)], alq.total_epochs, strategy="ddp_fork", devices=2).fit(
        build("cnn"), data)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in rank0:
        for key in ("coords", "signed", "ready"):
            assert torch.equal(rank0[name][key], rank1[name][key]), (name, key)
        assert bool(rank0[name]["ready"]) and bool((rank0[name]["coords"].view(torch.float32) > 0).all()), name


def test_a_classifier_module_loaded_without_the_callback_says_its_inputs_are_float(tmp_path):
    def module() -> ClassifierModule:
        torch.manual_seed(0)
        return ClassifierModule(small_cnn(), 4, optimizer=partial(torch.optim.Adam, lr=1e-3))

    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    alq = schedule()
    trainer([alq, saver], alq.total_epochs, enable_checkpointing=True).fit(module(), loader())
    with pytest.warns(UserWarning, match=r"trained with quantized inputs on \['model.3', 'model.6', 'model.10'\]; "
                                         r"loaded without ActivationQuantization"):
        ClassifierModule.load_from_checkpoint(tmp_path / "last.ckpt", net=small_cnn(),
                                              optimizer=partial(torch.optim.Adam, lr=1e-3))
    again = schedule()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*trained with quantized inputs.*")
        trainer([again], again.total_epochs).test(module(), loader(), ckpt_path=tmp_path / "last.ckpt", verbose=False)


@pytest.mark.parametrize(("act_bits", "expected"), [
    ({"net.10": 3, "net.*": 2}, {"net.3": 2, "net.6": 2, "net.10": 3}),
    ({"net.1?": 1}, {"net.10": 1}),
])
def test_act_bits_per_layer_by_pattern(act_bits, expected, caplog):
    alq = schedule(act_bits=act_bits)
    module = build("cnn")
    with caplog.at_level("INFO"):
        trainer([alq], alq.total_epochs).fit(module, loader())
    assert {name: layer.act_bits for name, layer in alq.activations.layers.items()} == expected
    assert {row.name: row.act_bits for row in bit_summary(module).act_rows} == expected
    if "net.3" not in expected:
        assert "net.3 (no act_bits pattern matches)" in caplog.text


@pytest.mark.parametrize("act_bits", [{}, {"fc": 0}, {"fc": 9}, {"fc": True}, {3: 2}])
def test_bad_per_layer_act_bits_are_refused(act_bits):
    with pytest.raises(ValueError, match=r"act_bits=.* is not allowed; expected an integer in \[1, 8\] or a non-empty "
                                         r"mapping \{layer pattern: such an integer\}"):
        ActivationQuantization(act_bits)
