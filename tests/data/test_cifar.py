"""CIFAR-10 reader and data module on tiny files written in the real python-pickle format."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from alq_lightning.data import base, cifar
from alq_lightning.data.base import DataNotFoundError
from alq_lightning.data.cifar import CIFAR10DataModule, read_cifar10

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
PER_BATCH = 6


def batch_dict(index: int) -> dict:
    """One batch as the official files hold it: bytes keys, uint8 rows of R, G, B planes, a list of labels."""
    rng = np.random.default_rng(index)
    return {
        b"batch_label": f"batch {index}".encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, PER_BATCH)],
        b"data": rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8),
        b"filenames": [f"img_{index}_{i}.png".encode() for i in range(PER_BATCH)],
    }


def write_folder(folder: Path) -> dict[str, dict]:
    folder.mkdir(parents=True)
    batches = {name: batch_dict(i) for i, name in enumerate(BATCHES)}
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2))
    return batches


def write_archive(path: Path, source: Path) -> None:
    with tarfile.open(path, "w:gz") as archive:
        archive.add(source, arcname=cifar.FOLDER)


@pytest.fixture
def cifar_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, dict]]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    batches = write_folder(tmp_path / "src" / cifar.FOLDER)
    write_archive(tmp_path / "src" / cifar.ARCHIVE, tmp_path / "src" / cifar.FOLDER)
    return tmp_path, batches


def test_archive_and_folder_read_the_same_images_in_channel_order(cifar_files) -> None:
    tmp_path, batches = cifar_files
    from_archive = read_cifar10(tmp_path / "src" / cifar.ARCHIVE)
    from_folder = read_cifar10(tmp_path / "src" / cifar.FOLDER)
    train_x, train_y = from_archive["train"]
    assert train_x.shape == (5 * PER_BATCH, 3, 32, 32) and train_x.dtype == torch.uint8
    assert from_archive["test"][0].shape == (PER_BATCH, 3, 32, 32)
    for split in ("train", "test"):
        assert all(torch.equal(a, b) for a, b in zip(from_archive[split], from_folder[split]))
    first = batches["data_batch_1"][b"data"][0]
    assert train_x[0, 1, 0, 0] == first[1024] and train_x[0, 2, 31, 31] == first[3071]
    assert train_y[:PER_BATCH].tolist() == batches["data_batch_1"][b"labels"]
    assert from_archive["test"][1].tolist() == batches["test_batch"][b"labels"]


def test_datamodule_normalises_splits_and_augments(cifar_files) -> None:
    tmp_path, batches = cifar_files
    dm = CIFAR10DataModule(root=tmp_path / "src", val_size=6, batch_size=8, download=False)
    assert (dm.num_classes, dm.in_channels, dm.input_size) == (10, 3, 32)
    dm.setup()
    (train_x, _), (val_x, _), (test_x, _) = dm.split("train"), dm.split("val"), dm.split("test")
    assert train_x.shape == (24, 3, 32, 32) and val_x.shape == (6, 3, 32, 32) and test_x.shape == (6, 3, 32, 32)
    raw = batches["test_batch"][b"data"][0]
    assert test_x[0, 0, 0, 0].item() == pytest.approx((raw[0] / 255 - 0.4914) / 0.2470, abs=1e-5)
    assert test_x[0, 2, 0, 0].item() == pytest.approx((raw[2048] / 255 - 0.4465) / 0.2616, abs=1e-5)
    loader = dm.train_dataloader()
    assert loader.augment and loader.padding == 4 and len(loader) == 3
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64
    assert not dm.val_dataloader().augment


def test_root_may_hold_the_archive_only(cifar_files) -> None:
    tmp_path, _ = cifar_files
    only = tmp_path / "only"
    only.mkdir()
    os.replace(tmp_path / "src" / cifar.ARCHIVE, only / cifar.ARCHIVE)
    assert cifar.locate_cifar10(only, download=False) == only / cifar.ARCHIVE
    assert cifar.locate_cifar10(tmp_path / "src", download=False) == tmp_path / "src" / cifar.FOLDER


def test_python2_pickles_like_the_official_files_are_read() -> None:
    data = bytes(range(256)) * 24
    py2 = (
        b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03K\x00\x85U\x01b"
        b"\x87Rq\x04(K\x01K\x02M\x00\x0c\x86cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq\x06(K\x03U\x01|NNN"
        b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T" + len(data).to_bytes(4, "little") + data
        + b"tbU\x06labels]q\x07(K\x01K\x02eu."
    )
    images, labels = cifar.read_cifar_batch(io.BytesIO(py2), "py2")
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [1, 2]
    assert torch.equal(images.flatten(), torch.tensor(list(data), dtype=torch.uint8))


def test_pickles_with_code_are_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    folder = tmp_path / cifar.FOLDER
    write_folder(folder)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(ValueError, match="not allowed"):
        read_cifar10(folder)


def test_malformed_batch_is_named(tmp_path: Path) -> None:
    folder = tmp_path / cifar.FOLDER
    write_folder(folder)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="data_batch_3"):
        read_cifar10(folder)


def test_missing_cifar_raises_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError) as info:
        CIFAR10DataModule(root=None, download=False).prepare_data()
    for needle in (str(tmp_path / "cache"), "data.root=", "download=True", cifar.ARCHIVE):
        assert needle in str(info.value), needle


@pytest.mark.parametrize("name,download,reason", [
    ("typo", False, "does not exist"), ("typo", True, "does not exist"), ("empty", False, "download disabled"),
])
def test_explicit_root_that_cannot_serve_is_an_error(cifar_files, monkeypatch: pytest.MonkeyPatch, name: str,
                                                     download: bool, reason: str) -> None:
    tmp_path, _ = cifar_files
    cache = tmp_path / "cache" / "alq_lightning" / "cifar10"
    cache.mkdir(parents=True)
    os.replace(tmp_path / "src" / cifar.FOLDER, cache / cifar.FOLDER)
    assert CIFAR10DataModule(root=None, download=False, val_size=2).split("test")[0].shape[0] == PER_BATCH
    monkeypatch.setattr(base, "fetch_chunks", lambda url, timeout=60.0: pytest.fail("no download"))
    (tmp_path / "empty").mkdir()
    root = tmp_path / name
    with pytest.raises(DataNotFoundError) as info:
        CIFAR10DataModule(root=root, download=download).prepare_data()
    for needle in (f"data root {root} cannot serve", reason, str(root / cifar.ARCHIVE), "data.root=null"):
        assert needle in str(info.value), needle
    assert not root.exists() or not any(root.iterdir())


def test_labels_out_of_range_name_the_file(tmp_path: Path) -> None:
    folder = tmp_path / cifar.FOLDER
    write_folder(folder)
    batch = batch_dict(2)
    batch[b"labels"][4] = 200
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_3: label 200 at index 4 is outside \[0, 9\]"):
        CIFAR10DataModule(root=tmp_path, val_size=2).setup("fit")


def test_source_files_are_the_ones_read(cifar_files) -> None:
    tmp_path, _ = cifar_files
    dm = CIFAR10DataModule(root=tmp_path / "src", val_size=2)
    dm.setup()
    assert dm.source_files == [tmp_path / "src" / cifar.FOLDER]


def test_download_checks_the_md5(cifar_files, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path, _ = cifar_files
    payload = (tmp_path / "src" / cifar.ARCHIVE).read_bytes()

    def fetch(url: str, timeout: float = 60.0):
        assert url == cifar.CIFAR10_URL
        return len(payload), iter([payload[:1000], payload[1000:]])

    monkeypatch.setattr(base, "fetch_chunks", fetch)
    (tmp_path / "bad").mkdir()
    (tmp_path / "good").mkdir()
    with pytest.raises(DataNotFoundError, match="md5"):
        CIFAR10DataModule(root=tmp_path / "bad").prepare_data()
    assert not any((tmp_path / "bad").iterdir())
    monkeypatch.setattr(cifar, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    dm = CIFAR10DataModule(root=tmp_path / "good", val_size=2)
    dm.prepare_data()
    assert (tmp_path / "good" / cifar.ARCHIVE).read_bytes() == payload
    dm.setup("test")
    assert dm.split("test")[0].shape == (PER_BATCH, 3, 32, 32)


def test_archive_without_a_batch_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "partial.tar.gz"
    data = pickle.dumps(batch_dict(0), protocol=2)
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo(f"{cifar.FOLDER}/data_batch_1")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="data_batch_2"):
        read_cifar10(path)
