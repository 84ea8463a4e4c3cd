"""The quantizer's details a user relies on: the automatic layout kind of each module, the buffers ``attach``
registers (names, shapes, dtypes, fill, device) and that it is idempotent, the float reasons and errors of the
layer selection, ``find_layers``, ``resolve`` and ``float_remainder``."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from alq_lightning.layers import LayerSelection, attach, default_kind, find_layers, float_remainder, resolve
from alq_lightning.network import MultiBitNetwork

from quantized_models import Conv1D
from tiny import build

KEYS = ("codes", "coords", "mask", "weight_m", "weight_v", "weight_vmax", "coord_m", "coord_v", "coord_vmax",
        "latent")
FLOAT_KEYS = ("coords", "weight_m", "weight_v", "weight_vmax", "coord_m", "coord_v", "coord_vmax", "latent")


class OutInConv1D(nn.Module):
    """Named ``Conv1D`` with an ``nf``, but its weight is stored ``(out, in)`` like ``nn.Linear``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nf, nx))


OutInConv1D.__name__ = "Conv1D"


class OwnConv1D(nn.Module):
    """A user's own module that happens to be called ``Conv1D``: no ``nf`` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 4))


OwnConv1D.__name__ = "Conv1D"


class StackedConv1D(nn.Module):
    """Named ``Conv1D``; the last dimension of its weight is ``nf``."""

    def __init__(self) -> None:
        super().__init__()
        self.nf = 4
        self.weight = nn.Parameter(torch.randn(2, 3, 4))


StackedConv1D.__name__ = "Conv1D"


class AdaptedConv(nn.Conv2d):
    """A Conv2d with an extra low-rank matrix."""

    def __init__(self) -> None:
        super().__init__(4, 8, 3)
        self.adapter = nn.Parameter(torch.randn(8, 4))


@pytest.mark.parametrize(
    ("module", "attr", "kind"),
    [
        (nn.Conv2d(1, 8, 3), "weight", "conv"),
        (nn.Conv1d(8, 16, 3), "weight", "conv"),
        (AdaptedConv(), "weight", "conv"),
        (AdaptedConv(), "adapter", "rows"),
        (nn.Linear(4, 8), "weight", "rows"),
        (nn.Embedding(8, 4), "weight", "rows"),
        (Conv1D(nf=8, nx=4), "weight", "columns"),
        (OutInConv1D(nf=8, nx=4), "weight", "rows"),
        (OwnConv1D(), "weight", "rows"),
        (StackedConv1D(), "weight", "columns"),
    ],
    ids=["conv2d", "conv1d", "conv_subclass", "conv_extra_matrix", "linear", "embedding", "hf_conv1d",
         "conv1d_out_in", "conv1d_without_nf", "conv1d_last_dim_nf"],
)
def test_default_kind_of_each_module(module, attr, kind):
    assert default_kind(module, attr) == kind


def test_selection_uses_the_automatic_layout_of_each_kind():
    """Conv weights get the conv rule (kernelwise for 9-tap kernels), Linear weights rows, Hugging Face's
    ``Conv1D`` columns: its groups are the columns of the ``(in, out)`` matrix, one per output."""
    chosen, _ = LayerSelection(max_bits=3).select(build("cnn"))
    assert {name: layout.describe() for name, (_, layout, _) in chosen.items()} == {
        "net.0": "kernelwise", "net.3": "kernelwise", "net.6": "kernelwise", "net.10": "subchannelwise(1)"}
    chosen, _ = LayerSelection(max_bits=3).select(nn.Sequential(Conv1D(nf=8, nx=16)))
    (_, layout, max_bits), = chosen.values()
    assert (layout.describe(), layout.num_groups, layout.group_size, max_bits) == ("columnwise(1)", 8, 16, 3)


def test_attach_registers_the_documented_buffers():
    """``alq_<key>`` on the module of each weight; ``codes [G, n]`` uint8 with every base bit set (all +1),
    ``coords``/``mask``/coordinate statistics ``[G, K]``, weight statistics ``[G, n]``, ``latent [0, n]``;
    everything else zero (no live slot); float state stored as int32 bytes read as float32; none of it in
    ``state_dict``."""
    model = build("mlp")
    layers, left_float = attach(model, LayerSelection(max_bits=3))
    assert left_float == {}
    assert list(layers) == ["net.1", "net.3"]
    shapes = {"net.1": (32, 64), "net.3": (4, 32)}
    buffers = dict(model.named_buffers())
    assert sorted(buffers) == sorted(f"{name}.alq_{key}" for name in shapes for key in KEYS)
    for name, (groups, size) in shapes.items():
        layer = layers[name]
        assert (layer.name, layer.module_name, layer.attr) == (name, name, "weight")
        assert layer.module is model.get_submodule(name)
        expected = {"codes": (groups, size), "coords": (groups, 3), "mask": (groups, 3), "weight_m": (groups, size),
                    "weight_v": (groups, size), "weight_vmax": (groups, size), "coord_m": (groups, 3),
                    "coord_v": (groups, 3), "coord_vmax": (groups, 3), "latent": (0, size)}
        for key in KEYS:
            stored = buffers[f"{name}.alq_{key}"]
            assert tuple(stored.shape) == expected[key], (name, key)
            assert stored.dtype == {"codes": torch.uint8, "mask": torch.bool}.get(key, torch.int32), (name, key)
            value = layer.buffer(key)
            if key == "codes":
                assert bool((value == 7).all()), name
            elif key == "mask":
                assert not bool(value.any()), name
            else:
                assert value.dtype == torch.float32 and bool((value == 0).all()), (name, key)
        assert layer.module.alq_structure == "subchannelwise(1)"
    assert not [key for key in model.state_dict() if "alq_" in key]


def test_attach_names_the_buffers_of_other_parameters_after_the_parameter():
    model = build("transformer")
    layers, _ = attach(model, LayerSelection(max_bits=2, include=["*in_proj_weight", "net.head"]))
    assert list(layers) == ["net.encoder.self_attn.in_proj_weight", "net.head"]
    attention = model.net.encoder.self_attn
    names = {name for name, _ in attention.named_buffers(recurse=False)}
    assert names == {f"alq_in_proj_weight_{key}" for key in KEYS}
    assert attention.alq_in_proj_weight_structure == "subchannelwise(1)"
    layer = layers["net.encoder.self_attn.in_proj_weight"]
    assert (layer.module_name, layer.attr) == ("net.encoder.self_attn", "in_proj_weight")
    assert {name for name, _ in model.net.head.named_buffers()} == {f"alq_{key}" for key in KEYS}


def test_attach_is_idempotent():
    """Attaching the same selection again keeps the very buffers and the state they hold."""
    model = build("mlp")
    selection = LayerSelection(max_bits=3)
    network = MultiBitNetwork(*attach(model, selection))
    network.initialize()
    before = network.state_tensors()
    stored = {name: {key: getattr(layer.module, layer.buffer_name(key)) for key in KEYS}
              for name, layer in network.layers.items()}
    layers, _ = attach(model, selection)
    for name, layer in layers.items():
        for key in KEYS:
            assert getattr(layer.module, layer.buffer_name(key)) is stored[name][key], (name, key)
            assert torch.equal(layer.buffer(key), before[name][key]), (name, key)


def test_attaching_with_fewer_slots_replaces_the_buffers_whose_shape_changes():
    model = build("mlp")
    network = MultiBitNetwork(*attach(model, LayerSelection(max_bits=3)))
    network.initialize()
    layers, _ = attach(model, LayerSelection(max_bits=2))
    for name, layer in layers.items():
        groups = layer.layout.num_groups
        assert layer.state.max_bits == 2
        for key in ("coords", "mask", "coord_m", "coord_v", "coord_vmax"):
            value = layer.buffer(key)
            assert tuple(value.shape) == (groups, 2), (name, key)
            assert not bool(value.bool().any()), (name, key)


def test_attach_keeps_the_state_on_the_weights_device():
    """Buffers and latent weights are made on the device of the weight (here the meta device)."""
    model = build("mlp").to("meta")
    layers, _ = attach(model, LayerSelection(max_bits=2))
    for layer in layers.values():
        assert all(layer.buffer(key).device.type == "meta" for key in KEYS)
        layer.hold_latent(torch.zeros(layer.layout.num_groups, layer.layout.group_size, device="meta"))
        assert layer.buffer("latent").device.type == "meta"
        assert tuple(layer.buffer("latent").shape) == (layer.layout.num_groups, layer.layout.group_size)
        layer.hold_latent(None)
        assert layer.buffer("latent").device.type == "meta" and layer.buffer("latent").shape[0] == 0


@pytest.mark.parametrize("precision", ["bf16 weights", "64-true"])
def test_the_weight_is_sketched_in_the_dtype_of_the_state(precision):
    """Initialisation computes in the state's dtype, float32 here, whatever the weight's: a bf16 model gives the
    state of the same values in float32; a float32 model that ``precision="64-true"`` turns into float64 after
    ALQ attached (its state stays float32) gives the state of the float32 model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    if precision == "bf16 weights":
        model = model.to(torch.bfloat16)
    twin = copy.deepcopy(model).to(torch.float32)
    networks = [MultiBitNetwork(*attach(m, LayerSelection(max_bits=3))) for m in (model, twin)]
    if precision == "64-true":
        model.double()
    states = []
    for network in networks:
        network.initialize()
        states.append(network.state_tensors())
    for name, tensors in states[1].items():
        for key in ("codes", "coords", "mask"):
            assert states[0][name][key].dtype == tensors[key].dtype
            assert torch.equal(states[0][name][key], tensors[key]), (name, key)


class RootTable(nn.Module):
    """A raw Parameter on the root module, next to a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(8, 16))
        self.fc = nn.Linear(16, 4)


def test_a_parameter_of_the_root_module_is_named_after_the_parameter():
    model = RootTable()
    layers, _ = attach(model, LayerSelection(max_bits=2))
    assert list(layers) == ["table", "fc"]
    assert (layers["table"].module_name, layers["table"].attr) == ("", "table")
    assert {name for name, _ in model.named_buffers(recurse=False)} == {f"alq_table_{key}" for key in KEYS}
    assert list(find_layers(model)) == ["table", "fc"]
    assert resolve(model, "table") == (model, "table")
    assert list(float_remainder(model, ["table", "fc"])) == ["fc.bias"]


def test_find_layers_finds_what_attach_registered_with_its_structure():
    model = build("transformer")
    structures = {"net.head": "subchannelwise(2)", "net.embed": "subchannelwise(4)"}
    attached, _ = attach(model, LayerSelection(max_bits=2, structures=structures))
    found = find_layers(model)
    assert list(found) == list(attached) == ["net.position", "net.embed", "net.encoder.self_attn.in_proj_weight",
                                             "net.encoder.self_attn.out_proj", "net.encoder.linear1",
                                             "net.encoder.linear2", "net.head"]
    for name, layer in found.items():
        twin = attached[name]
        assert (layer.name, layer.module, layer.attr, layer.module_name) == (
            name, twin.module, twin.attr, twin.module_name), name
        assert layer.layout.describe() == twin.layout.describe(), name
        assert layer.param is twin.param, name
    assert found["net.head"].layout.describe() == "subchannelwise(2)"
    assert found["net.embed"].layout.describe() == "subchannelwise(4)"
    assert found["net.encoder.self_attn.in_proj_weight"].module_name == "net.encoder.self_attn"


def test_find_layers_of_a_float_model_is_empty():
    assert find_layers(build("mlp")) == {}


@pytest.mark.parametrize(
    ("name", "expected"),
    [("net.1", ("net.1", "weight")), ("net.encoder.self_attn.in_proj_weight", ("net.encoder.self_attn",
                                                                              "in_proj_weight")),
     ("net.position", ("net", "position")), ("net.1.weight", None), ("net.9", None), ("no.such", None),
     ("net.1.nothing", None)],
)
def test_resolve_maps_layer_names_to_parameters(name, expected):
    """Layer names, not fully qualified parameter names, resolve: a weight is named after its module."""
    model = build("transformer")
    model.net.add_module("1", nn.Linear(2, 2))
    found = resolve(model, name)
    if expected is None:
        assert found is None
    else:
        module_name, attr = expected
        assert found == (model.get_submodule(module_name), attr)


def test_float_remainder_is_everything_but_the_quantized_parameters():
    model = build("cnn")
    remainder = float_remainder(model, ["net.0", "net.10"])
    state = model.state_dict()
    expected = [key for key in state if key not in ("net.0.weight", "net.10.weight")]
    assert list(remainder) == expected
    for key, value in remainder.items():
        assert torch.equal(value, state[key]) and not value.requires_grad, key
    assert list(float_remainder(model, [])) == list(state)


class Tied(nn.Module):
    """An embedding whose table is also the output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.out = nn.Linear(4, 8)
        self.out.weight = self.embed.weight


def test_float_remainder_leaves_out_every_name_of_a_shared_weight():
    model = Tied()
    assert list(model.state_dict()) == ["embed.weight", "out.weight", "out.bias"]
    assert list(float_remainder(model, ["embed"])) == ["out.bias"]


class WithExtraState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.counter = Counter()


class Counter(nn.Module):
    def get_extra_state(self):
        return {"calls": 3}

    def set_extra_state(self, state) -> None:
        pass


def test_float_remainder_refuses_a_state_entry_that_is_not_a_tensor():
    with pytest.raises(ValueError) as error:
        float_remainder(WithExtraState(), ["fc"])
    assert str(error.value) == "state_dict entry 'counter._extra_state' is a dict, not a tensor; it cannot be packed"


@pytest.mark.parametrize(
    ("kwargs", "frozen", "left_float"),
    [
        (dict(types=["Linear"]), None, {"net.0": "type Conv2d not in types", "net.3": "type Conv2d not in types",
                                        "net.6": "type Conv2d not in types"}),
        (dict(include=["net.3", "net.10"]), None, {"net.0": "not matched by include",
                                                   "net.6": "not matched by include"}),
        (dict(include=["*.3.weight"]), None, {"net.0": "not matched by include", "net.6": "not matched by include",
                                              "net.10": "not matched by include"}),
        (dict(exclude=["net.6"]), None, {"net.6": "matched by exclude"}),
        (dict(keep_first=True), None, {"net.0": "first layer kept in float"}),
        (dict(keep_last=True), None, {"net.10": "last layer kept in float"}),
        (dict(), "net.3", {"net.3": "frozen (requires_grad=False); name it in include to quantize it"}),
        (dict(include=["*", "net.3"]), "net.3", {}),
    ],
    ids=["types", "include", "include_parameter_name", "exclude", "keep_first", "keep_last", "frozen",
         "frozen_named"],
)
def test_each_float_layer_says_why(kwargs, frozen, left_float):
    model = build("cnn")
    if frozen:
        model.get_submodule(frozen).weight.requires_grad_(False)
    chosen, floats = LayerSelection(max_bits=2, **kwargs).select(model)
    assert floats == left_float
    assert list(chosen) == [n for n in ("net.0", "net.3", "net.6", "net.10") if n not in left_float]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_bits_overrides={"head*": 2}),
         "max_bits_overrides pattern 'head*' matches no weight parameter; layers are: "
         "['net.0', 'net.3', 'net.6', 'net.10']"),
        (dict(structures={"head*": "kernelwise"}),
         "structures pattern 'head*' matches no weight parameter; layers are: ['net.0', 'net.3', 'net.6', 'net.10']"),
        (dict(exclude=["net.*"]),
         "no layer to quantize in TinyModule: candidates ['net.0', 'net.3', 'net.6', 'net.10'] were all left in float "
         "({'net.0': 'matched by exclude', 'net.3': 'matched by exclude', 'net.6': 'matched by exclude', "
         "'net.10': 'matched by exclude'})"),
    ],
)
def test_selection_errors_name_the_argument_and_the_layers(kwargs, message):
    with pytest.raises(ValueError) as error:
        LayerSelection(max_bits=2, **kwargs).select(build("cnn"))
    assert str(error.value) == message
