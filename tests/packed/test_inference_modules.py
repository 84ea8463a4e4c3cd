"""Packed inference of models beyond plain convs and Linears: attention (``out_proj`` read by its parent, raw
``in_proj_weight`` Parameters, the fused fast path), a module with two quantized Parameters, keyword arguments,
float64 and half-precision weights; and what a packed module holds (buffer names, state_dict)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from alq_lightning.layers import LayerSelection, attach, find_layers
from alq_lightning.network import MultiBitNetwork
from alq_lightning.packed.inference import PackedModel, dense_weight, load_packed_for_inference, pack_module
from alq_lightning.packed.io import export_packed, load_packed, read_packed


class TwoMatrices(nn.Module):
    """Two raw weight Parameters on one module, both quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(8, 12))
        self.b = nn.Parameter(torch.randn(12, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a @ self.b


class Attention(nn.Module):
    """Embedding Linear, a MultiheadAttention, a TransformerEncoderLayer (fast-path eligible in eval mode without
    gradients), two raw Parameters on one module and a head. Records the fast-path flag its forward sees."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.two = TwoMatrices()
        self.head = nn.Linear(8, 3)
        self.fastpath_seen: list[object] = []

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        self.fastpath_seen.append(torch.backends.mha.get_fastpath_enabled())
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.encoder(h, src_key_padding_mask=padding)
        return self.head(self.two(h).mean(dim=1))


LAYERS = ["embed", "attn.in_proj_weight", "attn.out_proj", "encoder.self_attn.in_proj_weight",
          "encoder.self_attn.out_proj", "encoder.linear1", "encoder.linear2", "two.a", "two.b", "head"]


def attention(seed: int = 0, dtype: torch.dtype = torch.float32) -> Attention:
    torch.manual_seed(seed)
    model = Attention().to(dtype).eval()
    network = MultiBitNetwork(*attach(model, LayerSelection(max_bits=3)))
    network.initialize()
    assert list(network.layers) == LAYERS
    return model


def reference(path, dtype: torch.dtype = torch.float32) -> Attention:
    """The model ``load_packed`` gives, frozen for inference (in float64 PyTorch's attention rounds differently
    when its weights require gradients, even under ``no_grad``); ``run`` calls it on the regular path."""
    return load_packed(path, Attention().to(dtype).eval()).requires_grad_(False)


def run(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@pytest.fixture
def attention_file(tmp_path):
    path = tmp_path / "attention.alq"
    export_packed(attention(), path)
    return path


def inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    return torch.randn(3, 5, 6, generator=gen).to(dtype), padding


def test_attention_model_gives_the_loaded_models_outputs(attention_file):
    x, padding = inputs()
    packed = load_packed_for_inference(attention_file, attention(seed=3))
    dense = reference(attention_file)
    assert packed.packed_layers == LAYERS
    with torch.no_grad():
        expected = run(dense, x)
        assert torch.equal(packed(x), expected)
        with_padding = run(dense, x, padding=padding)
        assert not torch.equal(with_padding, expected)
        assert torch.equal(packed(x, padding=padding), with_padding)
        assert torch.equal(packed(x, padding), with_padding)
    for name in ("attn", "encoder.self_attn.out_proj", "two"):
        module = packed.model.get_submodule(name)
        for attr, _ in module.named_buffers(recurse=False):
            if attr in ("weight", "in_proj_weight", "a", "b"):
                assert getattr(module, attr).numel() == 0, (name, attr)


def test_fast_path_is_off_during_the_packed_forward_only(attention_file):
    """The fused fast path would read weights without calling the modules that unpack them."""
    packed = load_packed_for_inference(attention_file, Attention)
    x, _ = inputs()
    enabled = torch.backends.mha.get_fastpath_enabled()
    try:
        for before in (True, False):
            torch.backends.mha.set_fastpath_enabled(before)
            with torch.no_grad():
                packed(x)
            assert packed.model.fastpath_seen[-1] is False
            assert torch.backends.mha.get_fastpath_enabled() is before
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def test_packed_buffers_are_named_after_their_parameter(attention_file):
    packed = load_packed_for_inference(attention_file, attention(seed=3))
    sections = ("mask", "bases", "coords")
    expected = {
        "embed": {"alq_packed_mask", "alq_packed_bases", "alq_packed_coords", "weight"},
        "attn": {f"alq_packed_in_proj_weight_{key}" for key in sections} | {"in_proj_weight"},
        "attn.out_proj": {"alq_packed_mask", "alq_packed_bases", "alq_packed_coords", "weight"},
        "two": {f"alq_packed_{attr}_{key}" for attr in ("a", "b") for key in sections} | {"a", "b"},
    }
    header = read_packed(attention_file).header
    entries = {entry["name"]: entry for entry in header["layers"]}
    for name, buffers in expected.items():
        module = packed.model.get_submodule(name)
        assert {key for key, _ in module.named_buffers(recurse=False)} == buffers, name
        assert not [key for key in vars(module) if key.startswith("alq_") and key.endswith("structure")], name
    assert torch.equal(packed.model.two.alq_packed_b_coords,
                       read_packed(attention_file).section(entries["two.b"]["coords"]))
    assert set(packed.state_dict()) == {f"model.{entry['name']}" for entry in header["float"]}
    assert packed.quantized_bytes == header["quantized_bytes"] == packed.packed_bytes()
    assert type(packed.quantized_bytes) is int


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dense_weight_has_the_models_dtype_and_the_loaded_value(tmp_path, dtype):
    """ŵ is computed in float64 for a float64 model (float32 otherwise) and given in the weight's dtype."""
    path = tmp_path / "m.alq"
    export_packed(attention(dtype=dtype), path)
    packed = load_packed_for_inference(path, lambda: Attention().to(dtype).eval())
    dense = reference(path, dtype)
    for name in ("embed", "head", "encoder.linear1"):
        weight = dense_weight(packed.model.get_submodule(name))
        assert weight.dtype == dtype and torch.equal(weight, dense.get_submodule(name).weight), name
    assert torch.equal(dense_weight(packed.model.attn, "in_proj_weight"), dense.attn.in_proj_weight)
    x, padding = inputs(dtype)
    with torch.no_grad():
        assert torch.equal(packed(x, padding=padding), run(dense, x, padding=padding))


def test_packed_model_reads_the_float_remainder_from_the_file(attention_file):
    """The float tensors (biases, norms) come from the file, not from the model given."""
    given = attention(seed=7)
    packed = PackedModel(given, read_packed(attention_file))
    dense = reference(attention_file)
    for key, value in packed.model.state_dict().items():
        assert torch.equal(value, dense.state_dict()[key]), key
    assert set(find_layers(packed.model)) == set()


def test_packing_puts_the_sections_on_the_weights_device(attention_file):
    """The file's sections are CPU bytes; :func:`pack_module` moves them to the weight's device (here ``meta``,
    standing in for an accelerator), and the emptied weight stays there too."""
    packed = read_packed(attention_file)
    entry = next(entry for entry in packed.header["layers"] if entry["name"] == "head")
    head = nn.Linear(8, 3, device="meta")
    pack_module(head, "weight", packed, entry)
    buffers = dict(head.named_buffers())
    assert set(buffers) == {"alq_packed_mask", "alq_packed_bases", "alq_packed_coords", "weight"}
    assert all(tensor.device.type == "meta" for tensor in buffers.values())
    assert [tensor.shape for key, tensor in buffers.items() if key != "weight"] == [
        packed.section(entry[key]).shape for key in ("mask", "bases", "coords")]
