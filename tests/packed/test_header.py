"""Packed files whose checksum is valid but whose header lies: refused before the model is touched, by the
loader, the packed-inference loader and the summary command line."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from alq_lightning.packed.cli import summary_main
from alq_lightning.packed.format import CHECKSUM_BYTES, PREAMBLE
from alq_lightning.packed.inference import load_packed_for_inference
from alq_lightning.packed.io import export_packed, load_packed, read_packed

from quantized_models import lenet, quantized

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "v1_tiny.alq"


def rewrite(path: Path, edit_header: Callable[[dict], object] = lambda header: None,
            edit_payload: Callable[[dict, bytearray], object] = lambda header, payload: None) -> None:
    """Apply the edits to ``path``'s header (re-serialised) and payload; fix the preamble and the checksum."""
    data = path.read_bytes()
    magic, version, length, _ = PREAMBLE.unpack(data[:PREAMBLE.size])
    header = json.loads(data[PREAMBLE.size:PREAMBLE.size + length])
    payload = bytearray(data[PREAMBLE.size + length:-CHECKSUM_BYTES])
    edit_header(header)
    edit_payload(header, payload)
    text = json.dumps(header).encode()
    body = PREAMBLE.pack(magic, version, len(text), PREAMBLE.size + len(text) + len(payload) + CHECKSUM_BYTES)
    path.write_bytes(body + text + payload + hashlib.sha256(body + text + payload).digest())


def layer(name: str) -> Callable[[dict], dict]:
    return lambda header: next(entry for entry in header["layers"] if entry["name"] == name)


def setter(get: Callable[[dict], dict], key: str, value: object) -> Callable[[dict], None]:
    return lambda header: get(header).__setitem__(key, value)


def revive_dead_slot(header: dict, payload: bytearray) -> None:
    """Set a mask bit of a dead slot of fc1: lengths unchanged, live_slots now wrong."""
    entry = layer("fc1")(header)
    start = entry["mask"]["offset"]
    bit = next(i for i in range(entry["num_groups"] * entry["max_bits"]) if not payload[start + i // 8] >> i % 8 & 1)
    payload[start + bit // 8] |= 1 << bit % 8


def poison_coordinate(header: dict, payload: bytearray) -> None:
    start = layer("fc2")(header)["coords"]["offset"]
    payload[start:start + 4] = torch.tensor([float("nan")]).numpy().tobytes()


def append_bytes(header: dict, payload: bytearray) -> None:
    payload.extend(bytes(8))


FIRST = lambda header: header["layers"][0]  # noqa: E731
FLOAT = lambda header: header["float"][0]  # noqa: E731
BAD_HEADERS = {
    "offset out of range": (setter(lambda h: layer("fc2")(h)["coords"], "offset", 10**9), "'fc2' coords starts at"),
    "negative offset": (setter(lambda h: FIRST(h)["mask"], "offset", -1), "offset=-1 must be an integer >= 0"),
    "unknown float dtype": (setter(FLOAT, "dtype", "float99"), "'float99' is not a torch dtype"),
    "wrong float dtype": (setter(FLOAT, "dtype", "float64"), "is 80 bytes, its shape and dtype give 160"),
    "unknown coord dtype": (setter(lambda h: h, "coord_dtype", "bfloat16"), "coord_dtype='bfloat16' must be"),
    "coord bits": (setter(lambda h: h, "coord_bits", 8), "coord_bits=8 must be one of (32, 16)"),
    "missing key": (lambda h: FIRST(h).pop("structure"), "layers[0] lacks 'structure'"),
    "wrong type": (setter(FIRST, "num_groups", "20"), "num_groups='20' must be an integer >= 0"),
    "bool as int": (setter(FIRST, "live_slots", True), "live_slots=True must be an integer"),
    "not an object": (lambda h: h["layers"].__setitem__(0, [1, 2]), "layers[0] is a list, not a JSON object"),
    "unknown structure": (setter(layer("conv2"), "structure", "rowwise"), "structure='rowwise' is unknown"),
    "structure vs groups": (setter(layer("conv2"), "structure", "kernelwise"), "gives 1000 groups of 25"),
    "shape vs groups": (setter(layer("fc1"), "shape", [500, 400]), "'fc1': subchannelwise"),
    "max_bits out of range": (setter(layer("fc1"), "max_bits", 9), "max_bits=9 must be an integer in [1, 8]"),
    "max_bits vs mask length": (setter(layer("fc1"), "max_bits", 3), "'fc1' mask is"),
    "live_slots vs lengths": (lambda h: layer("fc1")(h).__setitem__("live_slots", layer("fc1")(h)["live_slots"] + 1),
                              "'fc1' bases is"),
    "weight dtype": (setter(FIRST, "weight_dtype", "int64"), "weight_dtype='int64' must be a floating-point"),
    "duplicate layer": (lambda h: h["layers"].append(dict(h["layers"][0])), "layer 'conv1' appears twice"),
    "quantized bytes": (lambda h: h.__setitem__("quantized_bytes", h["quantized_bytes"] + 1), "quantized_bytes="),
    "float bytes": (lambda h: h.__setitem__("float_bytes", 0), "float_bytes=0, the float sections take"),
    "float shape": (setter(FLOAT, "shape", [21]), "is 80 bytes, its shape and dtype give 84"),
    "dropped float": (lambda h: h.__setitem__("float_bytes", h["float_bytes"] - h["float"].pop()["length"]),
                      "the sections end at byte"),
    "not a dict": (lambda h: (h.clear(), h.__setitem__("layers", None)), "lacks 'coord_bits'"),
}


@pytest.fixture
def packed_file(tmp_path) -> Path:
    path = tmp_path / "m.alq"
    export_packed(quantized(lenet), path)
    return path


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: tensor.clone() for key, tensor in [*model.state_dict().items(), *model.named_buffers()]}


def assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys(), f"attached: {sorted(set(after) - set(before))}"
    changed = [key for key, tensor in before.items() if not torch.equal(after[key], tensor)]
    assert not changed, f"changed before the error: {changed}"


@pytest.mark.parametrize("edit,message", BAD_HEADERS.values(), ids=BAD_HEADERS)
@pytest.mark.parametrize("target", [lenet, lambda: quantized(lenet, seed=3)], ids=["bare", "attached"])
def test_bad_header_is_refused_before_the_model_changes(packed_file, edit, message, target):
    rewrite(packed_file, edit)
    model = target()
    before = snapshot(model)
    with pytest.raises(ValueError, match="inconsistent header") as error:
        load_packed(packed_file, model)
    assert message in str(error.value)
    assert_untouched(model, before)


@pytest.mark.parametrize("edit_payload,message", [
    (revive_dead_slot, "'fc1': live_slots="),
    (poison_coordinate, "'fc2': a live coordinate is not finite"),
    (append_bytes, "the sections end at byte"),
])
def test_payload_contradicting_the_header_is_refused(packed_file, edit_payload, message):
    rewrite(packed_file, edit_payload=edit_payload)
    model = lenet()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_packed(packed_file, model)
    assert_untouched(model, before)
    with pytest.raises(ValueError, match=message):
        load_packed_for_inference(packed_file, model)
    assert_untouched(model, before)


# Headers true to their payload that do not fit the model: the reader passes them, both loaders refuse them.
MODEL_MISFITS = {
    # float32 bytes relabelled int32 (same size): loaded, they would be integers such as -1.13e9 in a float bias
    "int32 into a float bias": (setter(FLOAT, "dtype", "int32"),
                                "tensor 'conv1.bias' is float32 in the model, int32 in the file: a floating-point "
                                "tensor takes floating-point values only"),
}


@pytest.mark.parametrize("edit,message", MODEL_MISFITS.values(), ids=MODEL_MISFITS)
def test_header_that_does_not_fit_the_model_is_refused_by_both_loaders(packed_file, edit, message):
    rewrite(packed_file, edit)
    read_packed(packed_file)
    model = lenet()
    before = snapshot(model)
    for load in (load_packed, load_packed_for_inference):
        with pytest.raises(ValueError) as error:
            load(packed_file, model)
        assert str(error.value).startswith(message), load.__name__
        assert_untouched(model, before)


def test_float64_value_beyond_a_float32_model_is_refused(tmp_path):
    """A float64 model's bias of 1e39 is finite in its file; a float32 model would hold it as inf, so both
    loaders refuse it, while a float64 model takes it as it is."""
    source = quantized(lambda: lenet().double())
    with torch.no_grad():
        source.fc2.bias[3] = 1e39
    path = tmp_path / "m.alq"
    export_packed(source, path)
    model = lenet()
    before = snapshot(model)
    for load in (load_packed, load_packed_for_inference):
        with pytest.raises(ValueError) as error:
            load(path, model)
        assert str(error.value) == ("tensor 'fc2.bias' holds 1e+39 in the file (float64), which the model's float32 "
                                    "cannot hold (it would load as inf)"), load.__name__
        assert_untouched(model, before)
    assert torch.equal(load_packed(path, lenet().double()).fc2.bias, source.fc2.bias)


def test_header_that_is_not_json(packed_file):
    data = bytearray(packed_file.read_bytes())
    data[PREAMBLE.size] = ord("[")
    body = bytes(data[:-CHECKSUM_BYTES])
    packed_file.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(ValueError, match="header is not UTF-8 JSON"):
        load_packed(packed_file, lenet())


def test_header_longer_than_the_file(packed_file):
    data = bytearray(packed_file.read_bytes())
    magic, version, _, size = PREAMBLE.unpack(data[:PREAMBLE.size])
    data[:PREAMBLE.size] = PREAMBLE.pack(magic, version, size, size)
    body = bytes(data[:-CHECKSUM_BYTES])
    packed_file.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(ValueError, match=f"header does not fit in the {size}-byte file"):
        load_packed(packed_file, lenet())


def test_files_the_exporter_writes_pass(packed_file, tmp_path):
    read_packed(packed_file)
    read_packed(GOLDEN)
    rewrite(packed_file)  # re-serialised with other separators: the same file to the reader
    assert torch.equal(load_packed(packed_file, lenet()).fc1.weight, quantized(lenet).fc1.weight)


def test_summary_verifies_the_checksum(packed_file, capsys):
    data = packed_file.read_bytes()
    text = data[PREAMBLE.size:PREAMBLE.size + PREAMBLE.unpack(data[:PREAMBLE.size])[2]].decode()
    position = text.index('"live_slots":') + len('"live_slots":')
    digit = text[position]
    edited = text[:position] + str((int(digit) + 1) % 10) + text[position + 1:]
    packed_file.write_bytes(data.replace(text.encode(), edited.encode()))
    assert summary_main([str(packed_file)]) == 1
    assert "checksum does not match" in capsys.readouterr().err


def test_summary_checks_the_header(packed_file, capsys):
    rewrite(packed_file, setter(layer("fc1"), "max_bits", 3))
    assert summary_main([str(packed_file)]) == 1
    assert "inconsistent header: layer 'fc1' mask is" in capsys.readouterr().err
