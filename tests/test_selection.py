"""Which weight parameters are quantized, by default and by pattern, and with which group structure."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from alq_lightning import bit_summary, export_packed, load_packed, load_packed_for_inference
from alq_lightning.layers import LayerSelection, attach, find_layers
from alq_lightning.network import MultiBitNetwork
from alq_lightning.packed.inference import dense_weight

from quantized_models import Conv1D


class Scaled(nn.Module):
    """A custom layer with a raw matrix Parameter and a 1-D one."""

    def __init__(self) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.randn(16, 16) * 0.1)
        self.gain = nn.Parameter(torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.matrix) * self.gain


class Zoo(nn.Module):
    """One of each kind of weight a model may hold."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.position = nn.Parameter(torch.randn(1, 6, 16) * 0.1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.mix = Scaled()
        self.gpt = Conv1D(24, 16)
        self.bilinear = nn.Bilinear(24, 16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position
        h = h + self.attn(h, h, h, need_weights=False)[0]
        memory = h[..., :8]
        h = h + self.cross(h, memory, memory, need_weights=False)[0]
        h = self.mix(self.norm(h))
        return self.head(self.bilinear(self.gpt(h), h).relu()).mean(dim=1)


DEFAULT = {
    "embed": "subchannelwise(1)",
    "position": "subchannelwise(1)",
    "attn.in_proj_weight": "subchannelwise(1)",
    "attn.out_proj": "subchannelwise(1)",
    "cross.q_proj_weight": "subchannelwise(1)",
    "cross.k_proj_weight": "subchannelwise(1)",
    "cross.v_proj_weight": "subchannelwise(1)",
    "cross.out_proj": "subchannelwise(1)",
    "mix.matrix": "subchannelwise(1)",
    "gpt": "columnwise(1)",
    "bilinear": "subchannelwise(1)",
    "head": "subchannelwise(1)",
}


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 32, (3, 6), generator=torch.Generator().manual_seed(seed))


def test_every_weight_matrix_is_quantized_by_default_with_its_structure():
    torch.manual_seed(0)
    model = Zoo()
    layers, left_float = attach(model, LayerSelection(max_bits=3))
    assert {name: layer.layout.describe() for name, layer in layers.items()} == DEFAULT
    assert left_float == {}
    matrices = {id(p) for p in model.parameters() if p.dim() >= 2}
    assert {id(layer.param) for layer in layers.values()} == matrices, "every weight matrix, each once"
    assert not any(id(p) in {id(layer.param) for layer in layers.values()} for p in model.parameters() if p.dim() < 2)
    assert set(find_layers(model)) == set(layers)


def test_conv1d_groups_hold_the_inputs_of_one_output():
    torch.manual_seed(0)
    model = Zoo()
    layer = attach(model, LayerSelection(max_bits=3, include=["gpt"]))[0]["gpt"]
    weight = model.gpt.weight.detach()
    assert (layer.layout.num_groups, layer.layout.group_size) == (24, 16)
    assert torch.equal(layer.layout.to_groups(weight)[5], weight[:, 5])


@pytest.mark.parametrize(("include", "exclude", "expected"), [
    (["*.in_proj_weight"], [], ["attn.in_proj_weight"]),
    (["*_proj_weight"], [], ["attn.in_proj_weight", "cross.q_proj_weight", "cross.k_proj_weight",
                             "cross.v_proj_weight"]),
    (["*.weight"], [], ["embed", "attn.out_proj", "cross.out_proj", "gpt", "bilinear", "head"]),
    (["*"], ["embed", "position", "*proj*"], ["mix.matrix", "gpt", "bilinear", "head"]),
])
def test_patterns_match_layer_names_or_parameter_names(include, exclude, expected):
    layers, left_float = attach(Zoo(), LayerSelection(max_bits=2, include=include, exclude=exclude))
    assert list(layers) == expected
    assert set(layers) | set(left_float) == set(DEFAULT)


def test_types_select_by_module_class():
    layers, _ = attach(Zoo(), LayerSelection(max_bits=2, types=["Embedding", "MultiheadAttention"]))
    assert list(layers) == ["embed", "attn.in_proj_weight", "cross.q_proj_weight", "cross.k_proj_weight",
                            "cross.v_proj_weight"]


def test_every_quantized_parameter_holds_its_reconstruction_and_the_packed_file_rebuilds_the_model(tmp_path):
    torch.manual_seed(0)
    model = Zoo().eval()
    network = MultiBitNetwork(*attach(model, LayerSelection(max_bits=3)))
    network.initialize()
    for name, layer in network.layers.items():
        assert torch.equal(layer.param.detach(), layer.layout.from_groups(layer.state.reconstruct())), name
    path = tmp_path / "zoo.alq"
    report = export_packed(model, path)
    fresh = Zoo().eval()
    load_packed(path, fresh)
    packed = load_packed_for_inference(path, Zoo)
    for name, layer in network.layers.items():
        module = packed.model.get_submodule(layer.module_name)
        assert torch.equal(dense_weight(module, layer.attr), layer.param.detach()), name
    torch.backends.mha.set_fastpath_enabled(False)  # packed inference runs attention on its regular path
    try:
        with torch.no_grad():
            expected = model(tokens())
            assert torch.equal(fresh(tokens()), expected)
            # equal weights, but BLAS may round differently for tensors at other addresses
            torch.testing.assert_close(packed(tokens()), expected, rtol=1e-6, atol=1e-7)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert report.file_bytes == path.stat().st_size


def test_whole_model_accounting_lists_every_float_tensor_and_equals_the_packed_payload(tmp_path):
    torch.manual_seed(0)
    model = Zoo()
    network = MultiBitNetwork(*attach(model, LayerSelection(max_bits=3, exclude=["gpt"])))
    network.initialize()
    summary = bit_summary(model)
    expected = model.state_dict()
    quantized = {"position", "embed.weight", "attn.in_proj_weight", "attn.out_proj.weight", "cross.q_proj_weight",
                 "cross.k_proj_weight", "cross.v_proj_weight", "cross.out_proj.weight", "mix.matrix",
                 "bilinear.weight", "head.weight"}
    floats = {row.name: row for row in summary.floats}
    assert set(floats) == set(expected) - quantized
    assert floats["gpt.weight"].bytes == 16 * 24 * 4
    assert summary.remainder_bytes == sum(t.numel() * t.element_size() for k, t in expected.items() if k in floats)
    everything = sum(t.numel() * 4 for t in expected.values())
    assert summary.model_compression == pytest.approx(everything / (summary.storage_bytes + summary.remainder_bytes))
    report = export_packed(model, tmp_path / "zoo.alq")
    assert report.quantized_bytes + report.float_bytes == summary.model_bytes
    assert "left in float: gpt.weight 16x24 float32 1536 B" in str(summary)
