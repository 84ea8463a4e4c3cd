"""IDX reading, file locating, the missing-data error and checked, atomic downloads."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from alq_lightning.data import base, idx
from alq_lightning.data.base import ChecksumError, DataNotFoundError, download_file
from alq_lightning.data.idx import IDX_FILES, FashionMNISTDataModule, MNISTDataModule, locate_idx_files, read_idx

TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, written from the format's definition."""
    header = bytes([0, 0, TYPE_CODES[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx_set(folder: Path, n_train: int = 12, n_test: int = 6, gz: bool = True) -> None:
    """Four small IDX files with the official names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays = {
            f"{prefix}-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            f"{prefix}-labels-idx1-ubyte": (np.arange(n) % 10).astype(np.uint8),
        }
        for stem, array in arrays.items():
            data = idx_bytes(array)
            (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("dtype", list(TYPE_CODES))
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_every_type(tmp_path: Path, dtype: type, gz: bool) -> None:
    values = np.arange(30) * 7 - (0 if dtype == np.uint8 else 100)
    array = values.astype(dtype).reshape(2, 3, 5)
    data = idx_bytes(array)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    assert tuple(out.shape) == (2, 3, 5)
    np.testing.assert_array_equal(out.numpy(), array)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "not an IDX file"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 3) + b"abc", "not an IDX file"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"abc", "not an IDX file"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 3), "too short"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc", "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"abc", "truncated"),
        (b"\x1f\x8b" + b"garbage-not-gzip", "corrupt gzip"),
    ],
)
def test_read_idx_rejects_malformed_files_naming_the_path(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28), np.uint8)))[:-20])
    with pytest.raises(ValueError, match=str(path)):
        read_idx(path)


@pytest.fixture
def no_standard_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty cache dir; Fashion-MNIST's standard folder points nowhere."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = dataclasses.replace(idx.FASHION_MNIST, standard_dirs=(str(tmp_path / "absent"),))
    monkeypatch.setattr(FashionMNISTDataModule, "source", source)
    return tmp_path


def test_datamodule_reads_raw_files_from_root(no_standard_dirs: Path) -> None:
    write_idx_set(no_standard_dirs / "raw", gz=False)
    dm = FashionMNISTDataModule(root=no_standard_dirs / "raw", val_size=2, batch_size=4, download=False)
    dm.setup()
    assert dm.split("train")[0].shape == (10, 1, 28, 28) and dm.split("val")[0].shape == (2, 1, 28, 28)
    assert dm.split("test")[0].shape == (6, 1, 28, 28) and dm.split("test")[1].dtype == torch.int64
    assert len(dm.train_dataloader()) == 2 and len(dm.test_dataloader()) == 2


def test_root_is_searched_before_standard_dirs_and_torchvision_layout(no_standard_dirs: Path) -> None:
    write_idx_set(no_standard_dirs / "std")
    write_idx_set(no_standard_dirs / "user" / "FashionMNIST" / "raw")
    source = dataclasses.replace(FashionMNISTDataModule.source, standard_dirs=(str(no_standard_dirs / "std"),))
    assert locate_idx_files(source, None, download=False)[IDX_FILES[0]].parent == no_standard_dirs / "std"
    found = locate_idx_files(source, no_standard_dirs / "user", download=False)
    assert found[IDX_FILES[0]].parent == no_standard_dirs / "user" / "FashionMNIST" / "raw"


def test_missing_files_raise_one_clear_error(no_standard_dirs: Path) -> None:
    dm = FashionMNISTDataModule(root=None, download=False)
    with pytest.raises(DataNotFoundError) as info:
        dm.prepare_data()
    text = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for needle in ("Fashion-MNIST", str(no_standard_dirs / "absent"),
                   str(no_standard_dirs / "cache" / "alq_lightning" / "fashion_mnist"), "data.root=",
                   "apt-get install dataset-fashion-mnist", "download=True", "network access"):
        assert needle in text, needle


@pytest.mark.parametrize("name,download,reason", [
    ("typo", False, "does not exist"), ("typo", True, "does not exist"), ("empty", False, "download disabled"),
])
def test_explicit_root_that_cannot_serve_is_an_error(no_standard_dirs: Path, monkeypatch: pytest.MonkeyPatch,
                                                     name: str, download: bool, reason: str) -> None:
    write_idx_set(no_standard_dirs / "absent")
    assert FashionMNISTDataModule(root=None, download=False, val_size=2).split("test")[0].shape[0] == 6
    monkeypatch.setattr(base, "fetch_chunks", lambda url, timeout=60.0: pytest.fail("no download"))
    (no_standard_dirs / "empty").mkdir()
    root = no_standard_dirs / name
    with pytest.raises(DataNotFoundError) as info:
        FashionMNISTDataModule(root=root, download=download).prepare_data()
    text = str(info.value)
    for needle in (f"data root {root} cannot serve", reason, *IDX_FILES, str(root / "FashionMNIST" / "raw"),
                   "data.root=null", str(no_standard_dirs / "absent")):
        assert needle in text, needle
    assert not root.exists() or not any(root.iterdir())


def test_partial_root_is_an_error(no_standard_dirs: Path) -> None:
    write_idx_set(no_standard_dirs / "absent")
    write_idx_set(no_standard_dirs / "mine")
    (no_standard_dirs / "mine" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match="cannot serve; download disabled"):
        FashionMNISTDataModule(root=no_standard_dirs / "mine", download=False, val_size=2).setup()


def test_source_files_are_the_ones_read(no_standard_dirs: Path) -> None:
    write_idx_set(no_standard_dirs / "absent")
    write_idx_set(no_standard_dirs / "mine", gz=False)
    dm = FashionMNISTDataModule(root=no_standard_dirs / "mine", download=False, val_size=2)
    dm.setup()
    assert dm.source_files == [no_standard_dirs / "mine" / stem for stem in IDX_FILES]


@pytest.mark.parametrize("labels,message", [
    (np.array([0, 1, 200, 3, 4, 5], np.uint8), r"label 200 at index 2 is outside \[0, 9\] \(10 classes\)"),
    (np.array([0, 1, 2, 3, 4, -1], np.int8), r"label -1 at index 5 is outside \[0, 9\]"),
    (np.arange(6, dtype=np.float32), r"labels are torch.float32; expected integers in \[0, 9\]"),
])
def test_labels_out_of_range_name_the_file(no_standard_dirs: Path, labels: np.ndarray, message: str) -> None:
    write_idx_set(no_standard_dirs / "mine")
    path = no_standard_dirs / "mine" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(labels)))
    dm = FashionMNISTDataModule(root=no_standard_dirs / "mine", download=False, val_size=2)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        dm.setup("test")


def test_failed_download_is_reported_in_the_error(no_standard_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float = 60.0) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(base, "fetch_chunks", offline)
    (no_standard_dirs / "m").mkdir()
    with pytest.raises(DataNotFoundError, match="network is unreachable"):
        MNISTDataModule(root=no_standard_dirs / "m").prepare_data()
    assert not any((no_standard_dirs / "m").glob("*"))


def fake_fetch(payloads: dict[str, bytes], chunk: int = 7):
    def fetch(url: str, timeout: float = 60.0):
        data = payloads[url]
        return len(data), iter([data[i : i + chunk] for i in range(0, len(data), chunk)])

    return fetch


def test_download_file_checks_sha256_and_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"official bytes" * 100
    monkeypatch.setattr(base, "fetch_chunks", fake_fetch({"u": data}))
    dest = tmp_path / "sub" / "f.gz"
    sha, md5 = hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()
    assert download_file("u", dest, md5=md5, sha256=sha) == dest
    assert dest.read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["f.gz"]


@pytest.mark.parametrize("kind", ["md5", "sha256"])
def test_bad_checksum_leaves_no_file_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setattr(base, "fetch_chunks", fake_fetch({"u": b"tampered"}))
    dest = tmp_path / "f.gz"
    with pytest.raises(ChecksumError, match=kind):
        download_file("u", dest, **{kind: "0" * (32 if kind == "md5" else 64)})
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_leaves_no_file_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(url: str, timeout: float = 60.0):
        def chunks():
            yield b"partial"
            raise ConnectionResetError("connection reset")

        return None, chunks()

    monkeypatch.setattr(base, "fetch_chunks", broken)
    with pytest.raises(ConnectionResetError):
        download_file("u", tmp_path / "f.gz", md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_datamodule_downloads_verified_files_into_root(no_standard_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = no_standard_dirs / "served"
    write_idx_set(served)
    payloads = {MNISTDataModule.source.url + p.name: p.read_bytes() for p in served.iterdir()}
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}
    monkeypatch.setattr(MNISTDataModule, "source", dataclasses.replace(MNISTDataModule.source, md5=md5))
    monkeypatch.setattr(base, "fetch_chunks", fake_fetch(payloads))
    (no_standard_dirs / "dl").mkdir()
    dm = MNISTDataModule(root=no_standard_dirs / "dl", val_size=2, batch_size=4)
    dm.prepare_data()
    assert sorted(p.name for p in (no_standard_dirs / "dl").iterdir()) == sorted(f"{s}.gz" for s in IDX_FILES)
    dm.setup("test")
    assert dm.split("test")[0].shape == (6, 1, 28, 28)
