"""Which structure an exported layer gets: the checkpoint's saved one, else the one inferred from its dense weight;
a file whose layout is equivalent to the attached one (same groups under another name) loads into it."""
from __future__ import annotations

import pytest
import torch

from alq_lightning.layers import LayerSelection, attach, find_layers
from alq_lightning.models import LeNet5
from alq_lightning.network import MultiBitNetwork
from alq_lightning.packed.checkpoint import model_from_checkpoint
from alq_lightning.packed.io import export_packed, load_packed, read_packed

ARCH = {"name": "lenet5", "in_channels": 1, "num_classes": 10, "input_size": 16}
# conv1 is (20, 1, 5, 5): with one input channel, kernelwise and channelwise groups are the same 25 weights
SELECTION = LayerSelection(max_bits=3, structures={"conv1": "channelwise", "conv2": "pixelwise"})


def attached(seed: int) -> tuple[torch.nn.Module, MultiBitNetwork]:
    torch.manual_seed(seed)
    model = LeNet5(1, 10, 16).eval()
    network = MultiBitNetwork(*attach(model, SELECTION))
    network.initialize()
    return model, network


@pytest.mark.parametrize("saved", [True, False], ids=["saved structures", "older checkpoint"])
def test_an_exported_one_input_channel_conv_loads_into_the_model_it_came_from(tmp_path, saved):
    model, network = attached(seed=0)
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                  "alq": {f"model.{n}": t for n, t in network.state_tensors().items()},
                  "hyper_parameters": {"architecture": ARCH}}
    if saved:
        checkpoint["alq_structures"] = {f"model.{n}": s for n, s in network.structures().items()}
    export_packed(model_from_checkpoint(checkpoint), tmp_path / "m.alq")
    structures = {entry["name"]: entry["structure"] for entry in read_packed(tmp_path / "m.alq").header["layers"]}
    assert structures["conv1"] == ("channelwise" if saved else "kernelwise")
    assert structures["conv2"] == "pixelwise"
    target, _ = attached(seed=1)
    load_packed(tmp_path / "m.alq", target)
    assert find_layers(target)["conv1"].layout.describe() == "channelwise"
    for key, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_a_file_of_another_layout_with_the_same_shapes_is_still_refused(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(9, 4, 3))  # (4, 9, 3, 3): kernelwise and pixelwise are both [36, 9]
    network = MultiBitNetwork(*attach(model, LayerSelection(max_bits=2, structures={"0": "kernelwise"})))
    network.initialize()
    export_packed(model, tmp_path / "m.alq")
    other = torch.nn.Sequential(torch.nn.Conv2d(9, 4, 3))
    MultiBitNetwork(*attach(other, LayerSelection(max_bits=2, structures={"0": "pixelwise"}))).initialize()
    with pytest.raises(ValueError, match=r"layer '0' is attached as pixelwise with mask \(36, 2\); the file has "
                                         r"kernelwise with 36 groups x 2 bits"):
        load_packed(tmp_path / "m.alq", other)
