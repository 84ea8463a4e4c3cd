"""Inference from the packed form: exact outputs, dense weights only during a layer's own forward."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from alq_lightning.layers import find_layers
from alq_lightning.models import LeNet5
from alq_lightning.packed.inference import PackedModel, dense_weight, load_packed_for_inference
from alq_lightning.packed.io import export_packed, load_packed

from quantized_models import INPUTS, lenet, quantized, small_cnn


def assert_no_dense_weight(model: PackedModel) -> None:
    modules = dict(model.model.named_modules())
    for name in model.packed_layers:
        module = modules[name]
        assert module.weight.numel() == 0 and module.weight.untyped_storage().nbytes() == 0, name
        assert "weight" not in dict(module.named_parameters()), name
        buffers = [key for key, _ in module.named_buffers()]
        assert not any(key.startswith("alq_") and not key.startswith("alq_packed_") for key in buffers)


@pytest.mark.parametrize("coord_bits", [32, 16])
@pytest.mark.parametrize("build", [small_cnn, lenet], ids=["small_cnn", "lenet5"])
def test_outputs_equal_dense_model(tmp_path, build, coord_bits):
    source = quantized(build)
    report = export_packed(source, tmp_path / "m.alq", coord_bits)
    dense = load_packed(tmp_path / "m.alq", build().eval())
    packed = load_packed_for_inference(tmp_path / "m.alq", build)
    assert isinstance(packed, PackedModel) and not packed.training
    assert packed.packed_bytes() == report.quantized_bytes
    assert_no_dense_weight(packed)
    x = torch.randn(4, *INPUTS[build])
    with torch.no_grad():
        expected = dense(x)
        assert torch.equal(packed(x), expected)
        assert_no_dense_weight(packed)
        assert torch.equal(packed(x), expected)
    if coord_bits == 32:
        assert torch.equal(expected, source(x))
    assert_no_dense_weight(packed)


def test_weight_exists_only_during_its_forward(tmp_path):
    source = quantized(lenet)
    export_packed(source, tmp_path / "m.alq")
    packed = load_packed_for_inference(tmp_path / "m.alq", quantized(lenet, seed=4, max_bits=3))
    seen = {}
    for name in packed.packed_layers:
        module = dict(packed.model.named_modules())[name]
        module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, m.weight.clone()))
    with torch.no_grad():
        packed(torch.randn(2, 1, 28, 28))
    for name, module in source.named_modules():
        if name in seen:
            assert torch.equal(seen[name], module.weight), name
    assert torch.equal(dense_weight(packed.model.fc1), source.fc1.weight)
    assert_no_dense_weight(packed)


def test_weight_released_when_forward_raises(tmp_path):
    export_packed(quantized(lenet), tmp_path / "m.alq")
    packed = load_packed_for_inference(tmp_path / "m.alq", lenet())
    with pytest.raises(RuntimeError):
        packed(torch.randn(2, 1, 20, 20))
    assert_no_dense_weight(packed)


def test_wrong_model_is_refused_untouched(tmp_path):
    export_packed(quantized(lenet), tmp_path / "m.alq")
    model = LeNet5(1, 12, 28)
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="fc2"):
        load_packed_for_inference(tmp_path / "m.alq", model)
    assert isinstance(model.fc2.weight, nn.Parameter) and set(find_layers(model)) == set()
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in before.items())
