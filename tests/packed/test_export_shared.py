"""A weight shared by several modules is stored once in the packed file and restored in every module."""
from __future__ import annotations

import torch
from torch import nn

from alq_lightning import export_packed, load_packed, load_packed_for_inference
from alq_lightning.layers import LayerSelection, attach
from alq_lightning.network import MultiBitNetwork
from alq_lightning.packed.io import read_packed


class Tied(nn.Module):
    """An embedding tied to the output Linear, and two Linears sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(self.embed(x)).relu()).mean(dim=1))


def quantized(seed: int = 0) -> Tied:
    torch.manual_seed(seed)
    model = Tied()
    network = MultiBitNetwork(*attach(model, LayerSelection(max_bits=3)))
    network.initialize()
    return model


def test_shared_weights_are_stored_once_and_every_user_gets_the_reconstruction(tmp_path):
    model = quantized()
    path = tmp_path / "tied.alq"
    export_packed(model, path)
    header = read_packed(path).header
    assert [entry["name"] for entry in header["layers"]] == ["embed", "a"]
    stored = {entry["name"] for entry in header["float"]}
    assert stored == {"a.bias", "b.bias"}, "a shared weight's other names are not stored again"
    fresh = Tied()
    load_packed(path, fresh)
    assert fresh.b.weight is fresh.a.weight and fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.a.weight, model.a.weight)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    tokens = torch.randint(0, 16, (4, 5), generator=torch.Generator().manual_seed(1))
    expected = model(tokens)
    assert torch.equal(fresh(tokens), expected)
    with torch.no_grad():
        assert torch.equal(load_packed_for_inference(path, Tied)(tokens), expected)
