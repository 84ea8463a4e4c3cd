"""Input quantizers in packed files (format version 2): which version a file gets, the exactness of the JSON
coordinates, the checks of an ``activations`` entry, export refusing unfitted quantizers, and ``load_packed``
restoring quantizers so that the loaded model computes as the exported one."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from alq_lightning.activations import attach_activations
from alq_lightning.layers import LayerSelection, attach
from alq_lightning.network import MultiBitNetwork
from alq_lightning.packed.format import CHECKSUM_BYTES, PREAMBLE
from alq_lightning.packed.io import export_packed, load_packed, packed_summary, read_header, read_packed
from alq_lightning.summary import bit_summary


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def quantized(acts: dict[str, bool] | None = None, fit: bool = True, act_bits: int = 2) -> nn.Module:
    """:func:`network` with ALQ weights (3 bits) and, for each ``{layer: per_channel}`` of ``acts``, an input
    quantizer, fitted on one seeded batch when ``fit``."""
    model = network()
    MultiBitNetwork(*attach(model, LayerSelection(max_bits=3))).initialize()
    modules = dict(model.named_modules())
    layers = {}
    for name, per_channel in (acts or {}).items():
        layers |= attach_activations({name: modules[name]}, act_bits, per_channel)
    if fit and layers:
        for layer in layers.values():
            layer.enabled = True
        model.train()
        with torch.enable_grad():
            model(batch())
    return model.eval()


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def rewrite(path: Path, edit, version: int | None = None) -> None:
    """Rewrite ``path`` with its header edited by ``edit`` (and another preamble version), checksum renewed."""
    packed = read_packed(path)
    header = edit(json.loads(json.dumps(packed.header)))
    payload = bytes(packed.payload.numpy())
    text = json.dumps(header).encode()
    body = PREAMBLE.pack(b"ALQPACK\0", packed.version if version is None else version, len(text),
                         PREAMBLE.size + len(text) + len(payload) + CHECKSUM_BYTES)
    path.write_bytes(body + text + payload + hashlib.sha256(body + text + payload).digest())


def file_version(path: Path) -> int:
    return struct.unpack_from("<H", path.read_bytes(), 8)[0]


def test_a_model_without_quantized_inputs_is_written_as_version_1(tmp_path):
    """No input quantizer: version 1 and no ``activations`` key, as before version 2 existed."""
    export_packed(quantized(), tmp_path / "m.alq")
    assert file_version(tmp_path / "m.alq") == 1
    assert not any("activations" in entry for entry in read_header(tmp_path / "m.alq")["layers"])


def test_quantized_inputs_make_a_version_2_file_that_loads_into_the_same_outputs(tmp_path):
    """Quantizers on layers 2 (±1 codes, after a Tanh) and 5 (per channel, {0,1} codes, after a ReLU): version
    2; ``load_packed`` into a fresh model attaches them switched on and the outputs equal the exported model's
    exactly; the quantized input really changes the outputs."""
    model = quantized({"2": False, "5": True})
    export_packed(model, tmp_path / "m.alq")
    assert file_version(tmp_path / "m.alq") == 2
    entries = {entry["name"]: entry.get("activations") for entry in read_header(tmp_path / "m.alq")["layers"]}
    assert entries["0"] is None and entries["2"]["signed"] and not entries["5"]["signed"]
    assert (entries["2"]["act_bits"], len(entries["2"]["coords"]), len(entries["5"]["coords"])) == (2, 2, 288 * 2)
    x = batch(2)
    with torch.no_grad():
        expected = model(x)
        loaded = load_packed(tmp_path / "m.alq", network().eval())
        assert torch.equal(loaded(x), expected)
        modules = dict(model.named_modules())
        for name in ("2", "5"):
            assert torch.equal(dict(loaded.named_modules())[name].alq_act_coords, modules[name].alq_act_coords)
        plain = load_packed(tmp_path / "m.alq", network().eval())
        for module in (plain[2], plain[5]):
            for handle in module._alq_act_handles:
                handle.remove()
        assert not torch.allclose(plain(x), expected)


def test_loading_a_version_1_file_removes_earlier_input_quantizer_hooks(tmp_path):
    """A model that quantized inputs before computes as the file's model (float inputs) after loading a v1 file."""
    export_packed(quantized(), tmp_path / "plain.alq")
    model = load_packed(tmp_path / "plain.alq", quantized({"2": False}))
    reference = load_packed(tmp_path / "plain.alq", network().eval())
    assert not model[2]._alq_act_handles
    with torch.no_grad():
        assert torch.equal(model(batch()), reference(batch()))


def test_float32_coordinates_survive_json_exactly():
    """float32 -> Python float -> JSON text -> float -> float32 is the identity, over random, tiny (subnormal),
    huge and awkward values."""
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(10000, generator=g) * 10.0 ** torch.randint(-30, 30, (10000,), generator=g),
                        torch.tensor([1e-45, 1.4e-45, 3.4028235e38, 0.1, 1 / 3, -0.0, 2.0 ** -149])])
    values = values.float()
    back = torch.tensor(json.loads(json.dumps(values.tolist())), dtype=torch.float32)
    assert torch.equal(back.view(torch.int32), values.view(torch.int32))


def test_unfitted_quantizers_are_refused_by_export(tmp_path):
    model = quantized({"2": False}, fit=False)
    with pytest.raises(ValueError, match=r"input quantizer of layer '2' is attached but not fitted \(no training "
                                         r"batch has fitted it\)"):
        export_packed(model, tmp_path / "m.alq")
    assert not (tmp_path / "m.alq").exists()


def test_a_quantized_input_of_a_float_layer_is_refused(tmp_path):
    model = network()
    MultiBitNetwork(*attach(model, LayerSelection(max_bits=3, include=["0", "2"]))).initialize()
    layer = attach_activations({"5": model[5]}, 2)["5"]
    layer.enabled = True
    with torch.enable_grad():
        model.train()(batch())
    with pytest.raises(ValueError, match="the input of layer '5' is quantized but its weight is not"):
        export_packed(model.eval(), tmp_path / "m.alq")


def acts_of(name: str):
    return lambda header: next(entry for entry in header["layers"] if entry["name"] == name)["activations"]


def set_acts(name: str, key: str, value):
    def edit(header):
        acts_of(name)(header)[key] = value
        return header
    return edit


WHERE = "has an inconsistent header: layer '2' activations"
FLOAT32 = "must be a number that is finite in float32 (the dtype input coordinates load into)"


@pytest.mark.parametrize("edit,message", [
    (set_acts("2", "act_bits", 0), f"{WHERE}: act_bits=0 must be an integer in [1, 8]"),
    (set_acts("2", "act_bits", 9), f"{WHERE}: act_bits=9 must be an integer in [1, 8]"),
    (set_acts("2", "act_bits", True), f"{WHERE}: act_bits=True must be an integer >= 0"),
    (set_acts("2", "act_bits", 2.0), f"{WHERE}: act_bits=2.0 must be an integer >= 0"),
    (set_acts("2", "signed", 1), f"{WHERE}: signed=1 must be a boolean"),
    (set_acts("2", "coords", "0.5"), f"{WHERE}: coords='0.5' must be a list"),
    (set_acts("2", "coords", [0.5, None]), f"{WHERE}: coords[1]=None {FLOAT32}"),
    (set_acts("2", "coords", [0.5, True]), f"{WHERE}: coords[1]=True {FLOAT32}"),
    (set_acts("2", "coords", [0.5, float("nan")]), f"{WHERE}: coords[1]=nan {FLOAT32}"),
    (set_acts("2", "coords", [0.5, 1e400]), f"{WHERE}: coords[1]=inf {FLOAT32}"),
    # finite in float64, inf in float32: 1e39, and the first double that rounds to inf (half an ulp past the
    # largest float32, 3.4028234663852886e38), and an integer beyond float64
    (set_acts("2", "coords", [1e39, 0.5]), f"{WHERE}: coords[0]=1e+39 {FLOAT32}"),
    (set_acts("2", "coords", [0.5, -3.4028235677973366e38]), f"{WHERE}: coords[1]=-3.4028235677973366e+38 {FLOAT32}"),
    (set_acts("2", "coords", [0.5, 10**400]), f"{WHERE}: coords[1]={10**400} {FLOAT32}"),
    (set_acts("2", "coords", [0.5]), f"{WHERE}: coords holds 1 numbers, not a positive multiple of act_bits=2"),
    (set_acts("2", "coords", []), f"{WHERE}: coords holds 0 numbers, not a positive multiple of act_bits=2"),
    (set_acts("2", "coords", [0.5] * 6), f"{WHERE}: coords holds 3 rows of act_bits=2, expected 1 or a multiple "
                                         f"of 4 (its input channels)"),
    (set_acts("5", "coords", [0.5] * 4), "has an inconsistent header: layer '5' activations: coords holds 2 rows "
                                         "of act_bits=2, expected 1 or 288"),
    (lambda header: acts_of("2")(header).pop("signed") and header, f"{WHERE} lacks 'signed'"),
    (lambda header: [header["layers"][1].update(activations=[1]), header][1],
     "has an inconsistent header: layer '2' activations is a list, not a JSON object"),
], ids=["act_bits 0", "act_bits 9", "act_bits bool", "act_bits float", "signed int", "coords string",
        "coords null", "coords bool", "coords nan", "coords inf", "coords 1e39", "coords past float32",
        "coords long integer", "coords short", "coords empty", "conv rows", "linear rows", "no signed",
        "not an object"])
def test_activation_entries_are_checked_and_named(tmp_path, edit, message):
    path = tmp_path / "m.alq"
    export_packed(quantized({"2": False, "5": False}), path)
    rewrite(path, edit)
    with pytest.raises(ValueError) as error:
        read_packed(path)
    assert str(error.value) == f"{path} {message}"


def test_a_version_1_file_with_activations_is_refused(tmp_path):
    """A reader of version 1 would ignore the ``activations`` and compute with float inputs."""
    path = tmp_path / "m.alq"
    export_packed(quantized({"2": False}), path)
    rewrite(path, lambda header: header, version=1)
    with pytest.raises(ValueError) as error:
        read_packed(path)
    assert str(error.value) == (f"{path} has an inconsistent header: layer '2' has activations, which format "
                                f"version 1 does not have (a reader of version 1 would compute with float inputs); "
                                f"such a file must say version 2")


def test_coordinates_that_round_to_the_largest_float32_load_as_it(tmp_path):
    """The float32 check refuses only what loads as ``inf``: a double just under half an ulp past the largest
    float32 rounds to it (3.4028234663852886e38) and loads as that value."""
    path = tmp_path / "m.alq"
    export_packed(quantized({"2": False}), path)
    rewrite(path, set_acts("2", "coords", [3.4028235677973362e38, -0.5]))
    loaded = load_packed(path, network().eval())
    largest = torch.finfo(torch.float32).max
    assert loaded[2].alq_act_coords.view(torch.float32).tolist() == [[largest, -0.5]]


def test_per_channel_rows_must_match_the_models_channels(tmp_path):
    """The header allows any multiple of a Conv's ``shape[1]`` (its groups are not in the header); the model
    decides, before anything is loaded."""
    path = tmp_path / "m.alq"
    export_packed(quantized({"2": True}), path)
    rewrite(path, set_acts("2", "coords", [0.25, 0.5] * 4))  # 4 rows: shape[1] of a 2-group conv of 8 channels
    model = network().eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer '2': the file's input quantizer has 4 coordinate rows, the model's "
                                         "layer has 8 input channels"):
        load_packed(path, model)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert not hasattr(model[2], "alq_act_coords")



def test_the_summary_of_a_file_lists_its_activation_bits_without_bops(tmp_path):
    """``alq-summary`` reads act_bits from the header; BOPs need a forward pass, which a file alone has not had."""
    model = quantized({"2": False, "5": True}, act_bits=3)
    export_packed(model, tmp_path / "m.alq")
    summary = packed_summary(read_header(tmp_path / "m.alq"))
    assert {row.name: row.act_bits for row in summary.rows} == {"0": 0, "2": 3, "5": 3}
    assert summary.header[-2:] == ("act_bits", "BOPs")
    assert "activations: 2 of 3 layer inputs at 3 bits; BOPs are counted once a forward pass ran" in str(summary)
    in_memory = bit_summary(model)
    assert in_memory.bops == 36 * 3 * in_memory.rows[1].bits.binary_bits + 3 * in_memory.rows[2].bits.binary_bits
