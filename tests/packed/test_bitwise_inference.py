"""``load_packed_for_inference(..., bitwise=True)``: Linear and Conv2d layers whose input is quantized compute
``Σ_k Σ_j α_k γ_j popcount-dot(β_k, b_j)`` per group from the packed bits, and give the outputs of the float
simulation (``ŵ`` times the quantized input ``x̂``) up to float rounding.

Tolerances: a bitwise layer sums exact integer dots weighted by float32 ``α γ`` in float64 and rounds once to
float32, so against the float64 product of ``ŵ`` and ``x̂`` (both formed exactly in float64) it differs by half
a float32 ulp (``2^-24`` relative) plus float64 rounding (1e-12 of the layer's largest output); the whole
model, whose float simulation runs in float32, agrees to ``rtol=atol=1e-5`` (float32 rounding, ~1e-7 relative
per layer, carried through a few layers).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alq_lightning.activations import attach_activations
from alq_lightning.core.activations import levels, nearest_levels
from alq_lightning.core.bitwise import group_dots, pack_bits
from alq_lightning.layers import LayerSelection, attach
from alq_lightning.network import MultiBitNetwork
from alq_lightning.packed.bitwise import group_inputs, packed_state, weight_bits
from alq_lightning.packed.inference import load_packed_for_inference
from alq_lightning.packed.io import export_packed

# input quantizers {layer: act_bits}; "1" reads a Tanh (±1 codes), "3" a ReLU ({0,1}), "6" a Tanh, "8" a ReLU
ACTS = {"1": 2, "3": 3, "6": 2, "8": 1}


class Net(nn.Module):
    """conv0 (float input) -> Tanh -> strided, padded, grouped conv1 -> ReLU -> dilated, padded conv3 -> Tanh ->
    Linear 6 (a 3-d input) -> ReLU -> Linear 8."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(),
            nn.Conv2d(8, 6, 3, padding=2, dilation=2, groups=2, bias=False), nn.Tanh(), nn.Flatten(2),
            nn.Linear(9, 12), nn.ReLU(), nn.Linear(12 * 6, 5),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.layers[0](x))
        for layer in self.layers[1:8]:
            x = layer(x)
        return self.layers[8](x.flatten(1))


def named(model: nn.Module) -> dict[str, nn.Module]:
    return {name.removeprefix("layers."): module for name, module in model.named_modules()
            if name.startswith("layers.")}


def build() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def batch(seed: int) -> torch.Tensor:
    return torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def quantized(structures: dict[str, str], per_channel: bool = False) -> nn.Module:
    """:class:`Net` with ALQ weights (3 bits, about a third of the slots pruned) and fitted input quantizers."""
    model = build()
    selection = LayerSelection(max_bits=3, structures={f"layers.{name}": s for name, s in structures.items()})
    network = MultiBitNetwork(*attach(model, selection))
    network.initialize()
    g = torch.Generator().manual_seed(1)
    network.clear_slots({name: torch.rand(layer.state.mask.shape, generator=g) < 0.3
                         for name, layer in network.layers.items()})
    modules = {f"layers.{name}": named(model)[name] for name in ACTS}
    layers = {}
    for name, act_bits in ACTS.items():
        layers |= attach_activations({f"layers.{name}": modules[f"layers.{name}"]}, act_bits, per_channel)
    for layer in layers.values():
        layer.enabled = True
    model.train()
    with torch.enable_grad():
        for seed in range(3):
            model(batch(seed))
    return model.eval()


CONV_STRUCTURES = ["kernelwise", "pixelwise", "channelwise"]


def export(tmp_path, structure: str, per_channel: bool = False) -> tuple[nn.Module, str]:
    structures = {"0": structure, "1": structure, "3": structure, "6": "subchannelwise(3)", "8": "subchannelwise(2)"}
    model = quantized(structures, per_channel)
    path = str(tmp_path / "m.alq")
    export_packed(model, path)
    return model, path


@pytest.mark.parametrize("structure", CONV_STRUCTURES)
def test_bitwise_outputs_equal_the_float_simulation_and_the_model(tmp_path, structure):
    """Signed and unsigned inputs of 1-3 bits, strided / padded / dilated / grouped convolutions and Linears on
    3-d inputs: the bitwise model equals the float-simulated packed model and the quantized model in memory
    (which equal each other exactly); each bitwise layer's output is the float64 product of its ŵ and the exact
    levels x̂, rounded once to float32."""
    model, path = export(tmp_path, structure)
    signs = {name: named(model)[name].alq_act_signed.item() for name in ACTS}
    assert signs == {"1": True, "3": False, "6": True, "8": False}
    simulated = load_packed_for_inference(path, build)
    bitwise = load_packed_for_inference(path, build, bitwise=True)
    assert bitwise.bitwise_layers == [f"layers.{name}" for name in ACTS] and simulated.bitwise_layers == []
    seen = {}
    for name in ACTS:
        module = named(bitwise.model)[name]
        module.register_forward_hook(lambda module, args, output, name=name: seen.__setitem__(name, (args[0], output)))
    x = batch(7)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(simulated(x), expected)
        result = bitwise(x)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
        for name, (inputs, output) in seen.items():
            module = named(bitwise.model)[name]
            layer = bitwise.activation_layers[f"layers.{name}"]
            quantized_input = exact_levels(layer.coords, inputs, layer.signed)
            weight = exact_weight(module)
            bias = None if module.bias is None else module.bias.double()
            if isinstance(module, nn.Conv2d):
                reference = F.conv2d(quantized_input, weight, bias, module.stride, module.padding, module.dilation,
                                     module.groups)
            else:
                reference = F.linear(quantized_input, weight, bias)
            assert output.dtype == torch.float32 and output.shape == reference.shape, name
            # the float32 output is the float64 result rounded once: within half a float32 ulp (2^-24 relative)
            bound = reference.abs() * 2**-24 * (1 + 1e-6) + 1e-12 * float(reference.abs().max())
            assert bool(((output.double() - reference).abs() <= bound).all()), name


def exact_weight(module: nn.Module) -> torch.Tensor:
    """``ŵ = Σ_k α_k β_k`` in float64 (exact for float32 ``α``; the packed model's dense ŵ is rounded to float32)."""
    state, layout = packed_state(module), module.alq_packed["weight"].layout
    signs = weight_bits(state).double() * 2 - 1
    return layout.from_groups((state.live_coords().double()[:, :, None] * signs).sum(dim=1))


def exact_levels(coords: torch.Tensor, inputs: torch.Tensor, signed: bool) -> torch.Tensor:
    """``x̂`` in float64: each element's nearest level ``γᵀ e`` summed exactly (the float simulation rounds the
    levels to float32; the bitwise execution never forms them)."""
    table = levels(coords.double(), signed)
    return table[0][nearest_levels(coords, inputs.reshape(1, -1), signed)].reshape(inputs.shape)


@pytest.mark.parametrize("structure", CONV_STRUCTURES)
@pytest.mark.parametrize("name", ["1", "3"])
def test_integer_group_dots_of_a_conv_equal_its_float_dots(tmp_path, structure, name):
    """End to end through a padded, strided / dilated, grouped conv: the popcount dots ``β_{g,k}ᵀ b_j`` of every
    group, slot, activation basis and output position equal, exactly, a float64 convolution of the ±1 / {0,1}
    basis plane ``e_j`` (zero padded by the convolution) with group g's slot-k signs alone."""
    _, path = export(tmp_path, structure)
    packed = load_packed_for_inference(path, build, bitwise=True)
    module = named(packed.model)[name]
    inputs = {}
    module.register_forward_pre_hook(lambda module, args: inputs.setdefault("x", args[0]))
    with torch.no_grad():
        packed(batch(5))
    x = inputs["x"]
    layout, state = module.alq_packed["weight"].layout, packed_state(module)
    coords, signed = module.alq_act_coords.view(torch.float32), bool(module.alq_act_signed)
    codes, valid, outputs = group_inputs(module, layout, x, coords, signed)
    element_codes = nearest_levels(coords, x.reshape(1, -1), signed).reshape(x.shape)
    signs = weight_bits(state).double() * 2 - 1  # [G, K, n]
    assert valid.logical_not().any(), "the layer pads: some inputs must be invalid"
    for j in range(coords.shape[1]):
        dots = group_dots(pack_bits(weight_bits(state)), pack_bits((codes >> j) & 1 == 1), pack_bits(valid), signed)
        plane = ((element_codes >> j) & 1).double()
        plane = plane * 2 - 1 if signed else plane
        for g in range(layout.num_groups):
            for k in range(state.max_bits):
                only = torch.zeros(layout.num_groups, layout.group_size, dtype=torch.float64)
                only[g] = signs[g, k]
                conv = F.conv2d(plane, layout.from_groups(only), None, module.stride, module.padding,
                                module.dilation, module.groups)
                expected = conv[:, outputs[g]].reshape(-1)
                assert torch.equal(dots[:, g, k], expected.long()) and torch.equal(expected, expected.round()), (
                    j, g, k)


def test_per_channel_input_coordinates_cannot_run_bitwise(tmp_path):
    _, path = export(tmp_path, "kernelwise", per_channel=True)
    model = build()
    with pytest.raises(ValueError, match=r"layer 'layers.1' has per-channel input coordinates \(8 rows\): a dot "
                                         r"product over several channels cannot factor out one γ per basis, so it "
                                         r"cannot run bitwise; load with bitwise=False"):
        load_packed_for_inference(path, model, bitwise=True)
    assert isinstance(model.layers[1].weight, nn.Parameter) and not hasattr(model.layers[1], "alq_act_coords")
    simulated = load_packed_for_inference(path, build)
    assert len(simulated.activation_layers) == len(ACTS)


class WithConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(torch.tanh(x))).flatten(1))


def test_other_layers_with_quantized_inputs_keep_the_float_simulation(tmp_path):
    """A Conv1d's quantized input is simulated in float under ``bitwise=True``; the Linear runs bitwise."""
    torch.manual_seed(0)
    model = WithConv1d()
    MultiBitNetwork(*attach(model, LayerSelection(max_bits=2))).initialize()
    layers = attach_activations({"conv": model.conv, "fc": model.fc}, 2)
    for layer in layers.values():
        layer.enabled = True
    x = torch.randn(4, 4, 5, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        model.train()(x)
    export_packed(model.eval(), tmp_path / "m.alq")
    bitwise = load_packed_for_inference(tmp_path / "m.alq", WithConv1d, bitwise=True)
    assert bitwise.bitwise_layers == ["fc"] and bitwise.activation_layers["conv"].enabled
    with torch.no_grad():
        torch.testing.assert_close(bitwise(x), model(x), rtol=1e-5, atol=1e-5)


def test_bitwise_must_be_a_bool(tmp_path):
    _, path = export(tmp_path, "kernelwise")
    with pytest.raises(ValueError, match="bitwise='yes' must be True or False"):
        load_packed_for_inference(path, build, bitwise="yes")


def test_a_layout_whose_groups_span_outputs_cannot_run_bitwise(tmp_path):
    """``columnwise`` on a Linear's ``(out, in)`` weight puts weights of several outputs in one group."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Tanh(), nn.Linear(4, 6))
    MultiBitNetwork(*attach(model, LayerSelection(max_bits=2, structures={"1": "columnwise(2)"}))).initialize()
    layer = attach_activations({"1": model[1]}, 2)["1"]
    layer.enabled = True
    with torch.enable_grad():
        model.train()(torch.randn(8, 4))
    export_packed(model.eval(), tmp_path / "m.alq")
    with pytest.raises(ValueError, match=r"layer '1': a group of the columnwise\(2\) layout on \(6, 4\) spans "
                                         r"several outputs, so it cannot run bitwise"):
        load_packed_for_inference(tmp_path / "m.alq", nn.Sequential(nn.Tanh(), nn.Linear(4, 6)), bitwise=True)
