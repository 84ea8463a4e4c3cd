"""The exact message for each way a checksummed packed file's header can contradict itself or its payload:
it names the part of the header (``the header``, ``layers[i]``, ``layer 'name' section``, ``float[i]``,
``float tensor 'name'``), the field, the value found and the value expected."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from alq_lightning.models import LeNet5
from alq_lightning.packed.format import CHECKSUM_BYTES, PREAMBLE
from alq_lightning.packed.io import export_packed, read_packed

from quantized_models import quantized

SIZES = "its num_groups, group_size, max_bits, live_slots and the coord_dtype"


def write(path: Path, header: object, payload: bytes) -> None:
    """A packed file holding ``header`` (any JSON value) and ``payload``, with a valid preamble and checksum."""
    text = json.dumps(header).encode()
    body = PREAMBLE.pack(b"ALQPACK\0", 1, len(text), PREAMBLE.size + len(text) + len(payload) + CHECKSUM_BYTES)
    path.write_bytes(body + text + payload + hashlib.sha256(body + text + payload).digest())


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[dict, bytes]:
    """``(header, payload)`` of a LeNet5 for 16x16 inputs (conv1, conv2, fc1, fc2; four biases), 4 bits."""
    path = tmp_path_factory.mktemp("exported") / "m.alq"
    export_packed(quantized(lambda: LeNet5(1, 10, 16)), path)
    packed = read_packed(path)
    return packed.header, bytes(packed.payload.numpy())


def layer(header: dict, name: str) -> dict:
    return next(entry for entry in header["layers"] if entry["name"] == name)


def floats(header: dict, name: str) -> dict:
    return next(entry for entry in header["float"] if entry["name"] == name)


def assign(get: Callable[[dict], dict], key: str, value: object) -> Callable[[dict], dict]:
    def edit(header: dict) -> dict:
        get(header)[key] = value
        return header
    return edit


def remove(get: Callable[[dict], dict], key: str) -> Callable[[dict], dict]:
    def edit(header: dict) -> dict:
        del get(header)[key]
        return header
    return edit


def append_copy(key: str) -> Callable[[dict], dict]:
    def edit(header: dict) -> dict:
        header[key].append(dict(header[key][0]))
        return header
    return edit


def conv1(header: dict) -> dict:
    return layer(header, "conv1")


def bias1(header: dict) -> dict:
    return floats(header, "conv1.bias")


# (edit of the header, message; ``{q}`` is the header's quantized_bytes, ``{f}`` its float_bytes)
MESSAGES = {
    "header not an object": (lambda h: [h], "the header is a list, not a JSON object"),
    "header lacks a key": (remove(lambda h: h, "coord_bits"), "the header lacks 'coord_bits'"),
    "layers not a list": (assign(lambda h: h, "layers", {}), "the header: layers={{}} must be a list"),
    "coord_dtype": (assign(lambda h: h, "coord_dtype", "bfloat16"),
                    "coord_dtype='bfloat16' must be 'float32' with coord_bits=32"),
    "structure not a string": (assign(conv1, "structure", 5), "layers[0]: structure=5 must be a string"),
    "shape not a list": (assign(conv1, "shape", "20x1x5x5"), "layers[0]: shape='20x1x5x5' must be a list"),
    "section not an object": (assign(conv1, "mask", []), "layers[0]: mask=[] must be a JSON object"),
    "section lacks offset": (remove(lambda h: conv1(h)["mask"], "offset"), "layer 'conv1' mask lacks 'offset'"),
    "section offset type": (assign(lambda h: conv1(h)["bases"], "length", 1.5),
                            "layer 'conv1' bases: length=1.5 must be an integer >= 0"),
    "unknown weight dtype": (assign(conv1, "weight_dtype", "float99"),
                             "layer 'conv1': weight_dtype: dtype 'float99' is not a torch dtype"),
    "integer weight dtype": (assign(conv1, "weight_dtype", "int64"),
                             "layer 'conv1': weight_dtype='int64' must be a floating-point dtype"),
    # fc1 is 500 groups x 4 slots: its mask takes 2000 bits = 250 bytes, 3 slots would take 1500 bits = 188 bytes
    "mask length": (assign(lambda h: layer(h, "fc1"), "max_bits", 3),
                    f"layer 'fc1' mask is 250 bytes, {SIZES} give 188"),
    "float lacks a key": (remove(bias1, "dtype"), "float[0] lacks 'dtype'"),
    "float not an object": (lambda h: {**h, "float": ["conv1.bias"]}, "float[0] is a str, not a JSON object"),
    "unknown float dtype": (assign(bias1, "dtype", "float99"),
                            "float tensor 'conv1.bias': dtype: dtype 'float99' is not a torch dtype"),
    "fractional float shape": (assign(bias1, "shape", [20.0]),
                               "float tensor 'conv1.bias': shape=[20.0] must list integers >= 0"),
    "negative float shape": (assign(bias1, "shape", [-20]),
                             "float tensor 'conv1.bias': shape=[-20] must list integers >= 0"),
    "float length": (assign(bias1, "shape", [21]),
                     "float tensor 'conv1.bias' is 80 bytes, its shape and dtype give 84"),
    "float offset": (lambda h: assign(bias1, "offset", h["quantized_bytes"] + 4)(h),
                     "float tensor 'conv1.bias' starts at byte {q4}, expected {q} (sections follow each other)"),
    "duplicate float": (append_copy("float"), "float tensor 'conv1.bias' appears twice"),
    "float bytes": (assign(lambda h: h, "float_bytes", 0), "float_bytes=0, the float sections take {f}"),
}


@pytest.mark.parametrize("edit,message", MESSAGES.values(), ids=MESSAGES)
def test_inconsistent_header_message(tmp_path, exported, edit, message):
    header, payload = exported
    path = tmp_path / "m.alq"
    write(path, edit(json.loads(json.dumps(header))), payload)
    expected = message.format(q=header["quantized_bytes"], q4=header["quantized_bytes"] + 4, f=header["float_bytes"])
    assert header["float_bytes"] == 4 * (20 + 50 + 500 + 10)
    with pytest.raises(ValueError) as error:
        read_packed(path)
    assert str(error.value) == f"{path} has an inconsistent header: {expected}"


@pytest.mark.parametrize("shape", [[-20, 1, 5, 5], [20.0, 1, 5, 5], [20, True, 5, 5], [20, 1, 5, None]])
def test_layer_shape_must_list_positive_integers(tmp_path, exported, shape):
    header, payload = exported
    path = tmp_path / "m.alq"
    write(path, assign(conv1, "shape", shape)(json.loads(json.dumps(header))), payload)
    with pytest.raises(ValueError) as error:
        read_packed(path)
    message = str(error.value)
    assert message.startswith(f"{path} has an inconsistent header: layer 'conv1': ")
    assert message.endswith(f" layer 'conv1': shape={json.loads(json.dumps(shape))!r} must list integers >= 1")


@pytest.mark.parametrize("keep", [5, -4], ids=["inside the first mask", "inside the last bias"])
def test_payload_shorter_than_its_sections(tmp_path, exported, keep):
    """The payload lost bytes (the preamble and checksum rewritten to match): the first section that runs past
    its end is named with the byte where it ends."""
    header, payload = exported
    path = tmp_path / "m.alq"
    short = payload[:keep]
    write(path, header, short)
    if keep == 5:
        where, end = "layer 'conv1' mask", 10  # 20 groups x 4 slots: 80 bits
    else:
        where, end = "float tensor 'fc2.bias'", len(payload)
    with pytest.raises(ValueError) as error:
        read_packed(path)
    assert str(error.value) == (f"{path} has an inconsistent header: {where} ends at byte {end}, past the end of the "
                                f"{len(short)}-byte payload")

