"""Quantized inputs where a layer's forward never runs: attention's ``out_proj`` (read directly by
``nn.MultiheadAttention``), a weight read by ``F.linear``; evaluation quantizes each fitted quantizer's input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from alq_lightning import ActivationQuantization, ALQCallback, bit_summary, export_packed
from alq_lightning.activations import attach_activations, has_input_quantizer
from alq_lightning.core.activations import levels
from alq_lightning.packed.io import read_packed

from tiny import TinyModule, trainer


def schedule(**kwargs) -> ALQCallback:
    return ALQCallback(0.8, max_bits=3, rounds=1, basis_epochs=1, coordinate_epochs=1, ste_epochs=2,
                       final_coordinate_epochs=1, act_bits=2, **kwargs)


class Encoder(nn.Module):
    """``Linear -> nn.TransformerEncoderLayer -> Linear`` on the mean token: ``[B, 8, 6] -> [B, 4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(self.inp(x)).mean(dim=1))


class ReadDirectly(nn.Module):
    """``body``, then ``proj``'s weight and bias through ``F.linear`` (``proj`` itself is never called), then
    ``head``: ``[B, 6] -> [B, 4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.proj, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.linear(self.body(x).relu(), self.proj.weight, self.proj.bias).relu())


def data(shape: tuple[int, ...], n: int = 128, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = (x.flatten(1)[:, 0] > 0).long() * 2 + (x.flatten(1)[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=32)


class HookSpy(Callback):
    """Names of the Linear modules whose forward ran in a training batch; at each validation and test batch
    (under ``(stage, epoch)``) the ``{layer: enabled}`` of the input quantizers and the layers whose input the
    bit summary counts."""

    def __init__(self, quantization: ActivationQuantization) -> None:
        self.quantization, self.ran, self.enabled, self.counted = quantization, set(), {}, {}

    def setup(self, trainer, pl_module, stage) -> None:
        if stage == "fit":
            for name, module in pl_module.named_modules():
                if isinstance(module, nn.Linear):
                    module.register_forward_pre_hook(lambda m, args, name=name: self.ran.add(name)
                                                     if m.training else None)

    def _record(self, trainer, module, stage: str) -> None:
        self.enabled[stage, trainer.current_epoch] = {n: q.enabled for n, q in self.quantization.layers.items()}
        self.counted[stage, trainer.current_epoch] = {row.name for row in bit_summary(module).act_rows}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, pl_module, "validate")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._record(trainer, pl_module, "test")


def test_a_transformer_layer_between_two_linears(caplog):
    """``out_proj`` is named as a float input at setup and never counted; every counted quantizer was fitted, is
    the quantizer of a layer whose forward ran, and is on at evaluation, where its layer's inputs lie on its
    levels and the outputs differ from the float-input ones; the packed file carries exactly those."""
    torch.manual_seed(0)
    module, alq = TinyModule(Encoder()), schedule()
    spy = HookSpy(alq.activations)
    fit = trainer([alq, spy], alq.total_epochs, num_sanity_val_steps=0)
    with caplog.at_level("INFO"):
        fit.fit(module, data((8, 6)), data((8, 6), seed=1))
    assert ("net.encoder.self_attn.out_proj (read directly by nn.MultiheadAttention: its forward, and an input hook, "
            "never runs)") in caplog.text
    counted = {row.name for row in bit_summary(module).act_rows}
    assert counted == {"net.encoder.linear1", "net.encoder.linear2", "net.out"} == set(alq.activations.layers)
    assert counted == spy.ran - {"net.inp"}, "net.inp is the first layer (quantize_first=False)"
    fit.test(module, data((8, 6), seed=2), verbose=False)
    assert all(layer.ready for layer in alq.activations.layers.values())
    assert set(spy.enabled) == {("validate", e) for e in range(alq.total_epochs)} | {("test", alq.total_epochs)}
    assert all(flags == dict.fromkeys(counted, True) for flags in spy.enabled.values())
    x = data((8, 6), seed=3).dataset.tensors[0][:16]
    seen = {}
    hooks = [getattr(module.net.encoder, name).register_forward_hook(
        lambda m, args, out, name=name: seen.__setitem__(name, args[0])) for name in ("linear1", "linear2")]
    module.eval()
    with torch.no_grad():
        quantized = module(x)
        for name in ("linear1", "linear2"):
            layer = alq.activations.layers[f"net.encoder.{name}"]
            assert bool(torch.isin(seen[name].unique(), levels(layer.coords, layer.signed)).all()), name
        for hook in hooks:
            hook.remove()
        alq.activations._enable(False)
        float_inputs = module(x)
    assert not torch.allclose(quantized, float_inputs, atol=1e-3)


def test_a_weight_read_directly_is_dropped_after_the_first_epoch_and_the_others_stay_on(tmp_path):
    """``proj``'s hook never runs: at the first validation ``head`` is quantized on its own, at the epoch's end
    ``proj`` is detached with a warning naming it, it is never counted, and the model exports."""
    torch.manual_seed(0)
    module, alq = TinyModule(ReadDirectly()), schedule()
    spy = HookSpy(alq.activations)
    fit = trainer([alq, spy], alq.total_epochs, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match=r"the inputs of \['net.proj'\] stay float and are not counted: no training "
                                         r"batch of epoch 0 with quantized inputs reached its input hook"):
        fit.fit(module, data((6,)), data((6,), seed=1))
    assert spy.enabled["validate", 0] == {"net.proj": False, "net.head": True}
    assert all(counted == {"net.head"} for counted in spy.counted.values())
    assert all(flags == {"net.head": True} for key, flags in spy.enabled.items() if key[1] > 0)
    assert set(alq.activations.layers) == {"net.head"} and not has_input_quantizer(module.net.proj)
    assert {row.name: row.act_bits for row in bit_summary(module).act_rows} == {"net.head": 2}
    fit.test(module, data((6,), seed=2), verbose=False)
    assert spy.enabled["test", alq.total_epochs] == {"net.head": True}
    export_packed(module.net, tmp_path / "m.alq")
    header = read_packed(tmp_path / "m.alq").header
    assert {entry["name"] for entry in header["layers"] if "activations" in entry} == {"head"}


def test_quantizers_the_fit_never_reached_are_dropped_at_its_end_or_at_an_evaluation():
    """``start_epoch`` after the fit's last epoch: no quantizer is fitted; the fit's end names them, and a test
    afterwards computes with float inputs. A test without a fit drops them when it starts."""
    torch.manual_seed(0)
    module = TinyModule(ReadDirectly())
    quantization = ActivationQuantization(2, start_epoch=3)
    fit = trainer([quantization], 2, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match=r"the inputs of \['net.proj', 'net.head'\] stay float and are not counted: "
                                         r"the fit ended before its inputs were quantized \(from epoch 3 on\)"):
        fit.fit(module, data((6,)))
    assert not quantization.layers and not has_input_quantizer(module.net.head)
    fit.test(module, data((6,), seed=2), verbose=False)
    assert not has_input_quantizer(module.net.head)
    fresh = ActivationQuantization(2)
    with pytest.warns(UserWarning, match=r"the inputs of \['net.proj', 'net.head'\] stay float and are not counted: "
                                         r"not fitted: no training batch has reached it, and no checkpoint holds it"):
        trainer([fresh], 1).test(module, data((6,), seed=2), verbose=False)
    assert not fresh.layers and not has_input_quantizer(module.net.head)


def test_an_enabled_quantizer_that_no_batch_fitted_passes_its_input_through():
    """Its levels are all 0 until a training batch fits them: evaluation must not map every input to 0."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 3)
    x = torch.randn(5, 6)
    expected = linear(x)
    layer = attach_activations({"fc": linear}, 2)["fc"]
    layer.enabled = True
    with torch.no_grad():
        assert torch.equal(linear.eval()(x), expected)
        assert torch.equal(linear.train()(x), expected), "no gradient: no fit"
    linear(x)
    assert layer.ready and not torch.equal(linear.eval()(x), expected)
