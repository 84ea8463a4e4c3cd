"""Write the golden packed file of the current format version: ``tests/golden/v{N}_tiny.alq``.

    python tests/golden/make_golden.py            # refuses when the files of this version exist
    python tests/golden/make_golden.py --force    # overwrite them (only when the format itself is meant to change)

The model (:class:`TinyNet`, seed 0) has a kernelwise conv (max_bits 4), a BatchNorm, a pixelwise conv
(max_bits 4) and a ``subchannelwise(2)`` Linear (max_bits 3), initialised by ALQ, with random slots and some
whole groups (always group 0) pruned, exported with 32-bit coordinates (about 3 KB). Live coordinates are
rounded to 12 significant bits, so that every reconstruction sum ``Σ_k α_k β_k`` is exact in float32 whatever
the order it is summed in: a decoder written elsewhere must then get the same ŵ bit for bit.

From version 2 on, the inputs of ``conv2`` and ``fc`` are quantized too (:data:`ACTIVATIONS`): fitted on one
seeded batch, ``conv2`` with one ±1-code coordinate vector of 2 bits (refitted as signed levels: its inputs,
after a ReLU, would otherwise take the {0,1} codes), ``fc`` with {0,1}-code coordinates of 3 bits per input
channel; their coordinates rounded to 12 significant bits as well.

Beside it, ``v{N}_tiny_weights.pt`` (``torch.save`` of a flat dict of tensors, readable with
``weights_only=True``) holds what was exported: every ``state_dict`` tensor (dense ŵ and float remainder)
under its key, each quantized layer's ``mask`` ``[G, K]``, ``codes`` ``[G, n]`` and ``coords`` ``[G, K]``
under ``multibit/<layer>/<name>``, and (version 2 on) each input quantizer's ``coords`` ``[C, J]`` float32 and
``signed`` (bool, 0-d) under ``activations/<layer>/<name>``. ``tests/packed/test_golden.py`` decodes the
committed bytes with its own reader and compares them with this file. Once committed, these files are the
format's reference: regenerate them only when the format version changes (then a new ``v{N+1}`` pair sits
beside the old ones).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from alq_lightning.activations import attach_activations
from alq_lightning.core.activations import fit_levels
from alq_lightning.layers import LayerSelection, attach, find_layers
from alq_lightning.network import MultiBitNetwork
from alq_lightning.packed.io import export_packed, read_header

HERE = Path(__file__).resolve().parent
SEED = 0
STRUCTURES = {"conv1": "kernelwise", "conv2": "pixelwise", "fc": "subchannelwise(2)"}
MAX_BITS = {"conv1": 4, "conv2": 4, "fc": 3}
SIGNIFICANT_BITS = 12
ACTIVATIONS = {"conv2": {"act_bits": 2, "per_channel": False, "signed": True},
               "fc": {"act_bits": 3, "per_channel": True, "signed": False}}


class TinyNet(nn.Module):
    """``[B, 3, 5, 5]`` -> conv 3x3 (6) -> BatchNorm -> ReLU -> conv 2x2 (4) -> ReLU -> Linear(16, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


def golden_paths(version: int) -> tuple[Path, Path]:
    """``(packed file, expected tensors)`` of format ``version``."""
    return HERE / f"v{version}_tiny.alq", HERE / f"v{version}_tiny_weights.pt"


def round_significant(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``values`` rounded to ``bits`` significant bits (zeros stay zero)."""
    mantissa, exponent = torch.frexp(values)
    return torch.ldexp(torch.round(mantissa * 2**bits) / 2**bits, exponent.to(values.dtype))


def build_golden_model(version: int = 1) -> nn.Module:
    """The seeded, initialised, pruned and rounded :class:`TinyNet` that the golden file of format ``version``
    holds (from version 2 on with the input quantizers of :data:`ACTIVATIONS`)."""
    torch.manual_seed(SEED)
    model = TinyNet().eval()
    model.bn1.running_mean.normal_()
    model.bn1.running_var.uniform_(0.5, 2.0)
    model.bn1.weight.data.normal_()
    model.bn1.bias.data.normal_()
    model.bn1.num_batches_tracked.fill_(7)
    network = MultiBitNetwork(*attach(model, LayerSelection(max_bits=4, structures=STRUCTURES,
                                                            max_bits_overrides=MAX_BITS)))
    network.initialize()
    gen = torch.Generator().manual_seed(SEED)
    chosen = {}
    for name, layer in network.layers.items():
        mask = layer.state.mask
        slots = torch.rand(mask.shape, generator=gen) > 0.6
        slots |= (torch.rand(mask.shape[0], generator=gen) < 0.2)[:, None]
        slots[0] = True
        chosen[name] = slots & mask
    network.clear_slots(chosen)
    for layer in find_layers(model).values():
        state = layer.state
        state.coords.copy_(round_significant(state.coords, SIGNIFICANT_BITS))
        layer.write_weight()
        exact = (state.live_coords().double()[:, :, None] * state.bases.double()).sum(dim=1)
        if not torch.equal(state.reconstruct().double(), exact):
            raise AssertionError(f"layer {layer.name!r}: a float32 reconstruction sum is not exact")
    if version >= 2:
        fit_activations(model)
    return model


def fit_activations(model: nn.Module) -> None:
    """Attach the input quantizers of :data:`ACTIVATIONS`, fit them on one seeded batch (``fc``'s by the hook
    of a training forward, ``conv2``'s as signed levels of the same inputs) and round their coordinates."""
    modules = dict(model.named_modules())
    layers = {name: attach_activations({name: modules[name]}, spec["act_bits"], spec["per_channel"])[name]
              for name, spec in ACTIVATIONS.items()}
    inputs = {}
    handle = model.conv2.register_forward_pre_hook(lambda module, args: inputs.setdefault("conv2", args[0]))
    batch = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(SEED))
    layers["fc"].enabled = True  # conv2's input stays float while fitting, so the two fits are independent
    model.fc.train()  # the hook fits a module in training mode; the BatchNorm's statistics stay as they are
    with torch.enable_grad():
        model(batch)
    model.fc.eval()
    handle.remove()
    signed_fit = fit_levels(inputs["conv2"].detach().reshape(1, -1), ACTIVATIONS["conv2"]["act_bits"], True)
    coords = {"conv2": signed_fit, "fc": layers["fc"].coords.clone()}
    for name, layer in layers.items():
        layer.load({"coords": round_significant(coords[name], SIGNIFICANT_BITS),
                    "signed": torch.tensor(ACTIVATIONS[name]["signed"]), "ready": torch.tensor(True)})
        layer.enabled = True
        if (layer.ready, layer.signed, layer.coords.shape[0] > 1) != (True, ACTIVATIONS[name]["signed"],
                                                                    ACTIVATIONS[name]["per_channel"]):
            raise AssertionError(f"the input quantizer of {name!r} is not the one ACTIVATIONS describes")


def expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The flat dict saved beside the golden file (see the module docstring)."""
    tensors = {key: value.detach().clone() for key, value in model.state_dict().items()}
    for name, module in model.named_modules():
        if getattr(module, "_alq_act_handles", ()):
            tensors[f"activations/{name}/coords"] = module.alq_act_coords.view(torch.float32).clone()
            tensors[f"activations/{name}/signed"] = module.alq_act_signed.clone()
    for name, layer in find_layers(model).items():
        state = layer.state
        for key, value in (("mask", state.mask), ("codes", state.codes), ("coords", state.coords)):
            tensors[f"multibit/{name}/{key}"] = value.clone()
    return tensors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="overwrite the golden files of this format version")
    args = parser.parse_args(argv)
    from alq_lightning.packed.format import FORMAT_VERSION

    packed, weights = golden_paths(FORMAT_VERSION)
    existing = [str(path) for path in (packed, weights) if path.exists()]
    if existing and not args.force:
        parser.error(f"{', '.join(existing)} exist(s): the golden files of format version {FORMAT_VERSION} are "
                     f"the reference other readers are checked against; pass --force only if the format changed")
    model = build_golden_model(FORMAT_VERSION)
    report = export_packed(model, packed, coord_bits=32)
    if read_header(packed).get("coord_bits") != 32:
        raise AssertionError("the golden file must hold 32-bit coordinates")
    torch.save(expected_tensors(model), weights)
    print(f"{report}\nwrote {packed} and {weights}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
