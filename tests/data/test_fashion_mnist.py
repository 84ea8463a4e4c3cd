"""The real Fashion-MNIST files of Debian's dataset-fashion-mnist package.

Skipped only when the files are absent and ``CI`` is unset; CI installs the package, so there they run.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from alq_lightning.data import FashionMNISTDataModule, read_idx, split_indices
from alq_lightning.data.idx import IDX_FILES

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
PRESENT = all((DEBIAN_DIR / f"{stem}.gz").is_file() for stem in IDX_FILES)
pytestmark = pytest.mark.skipif(
    not PRESENT and not os.environ.get("CI"),
    reason=f"Fashion-MNIST not in {DEBIAN_DIR} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def datamodule() -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(download=False, batch_size=128, val_size=10000, seed=0)
    dm.prepare_data()
    dm.setup()
    return dm


def test_official_files_have_the_published_shapes_and_balanced_labels() -> None:
    train_labels = read_idx(DEBIAN_DIR / "train-labels-idx1-ubyte.gz")
    test_labels = read_idx(DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz")
    test_images = read_idx(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz")
    assert train_labels.shape == (60000,) and test_labels.shape == (10000,)
    assert test_images.shape == (10000, 28, 28) and test_images.dtype == torch.uint8
    assert torch.equal(train_labels.long().bincount(), torch.full((10,), 6000))
    assert torch.equal(test_labels.long().bincount(), torch.full((10,), 1000))


def test_datamodule_finds_the_debian_files_and_splits_50k_10k(datamodule: FashionMNISTDataModule) -> None:
    assert (datamodule.num_classes, datamodule.in_channels, datamodule.input_size) == (10, 1, 28)
    (train_x, train_y), (val_x, val_y) = datamodule.split("train"), datamodule.split("val")
    test_x, test_y = datamodule.split("test")
    assert train_x.shape == (50000, 1, 28, 28) and val_x.shape == (10000, 1, 28, 28)
    assert test_x.shape == (10000, 1, 28, 28) and test_y.shape == (10000,)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    full = torch.cat([train_y, val_y]).bincount()
    assert torch.equal(full, torch.full((10,), 6000))
    # the published statistics normalise the training images to mean ~0, std ~1
    assert abs(train_x.mean().item()) < 0.01 and abs(train_x.std().item() - 1) < 0.01
    black = (0 - 0.2860) / 0.3530
    assert train_x.min().item() == pytest.approx(black, abs=1e-5)


def test_loaders_cover_the_splits(datamodule: FashionMNISTDataModule) -> None:
    train, test = datamodule.train_dataloader(), datamodule.test_dataloader()
    assert len(train) == 50000 // 128 and len(test) == -(-10000 // 128)
    images, labels = next(iter(train))
    assert images.shape == (128, 1, 28, 28) and labels.shape == (128,)
    assert sum(batch[1].shape[0] for batch in test) == 10000


def test_validation_split_is_the_seeded_one(datamodule: FashionMNISTDataModule) -> None:
    labels = read_idx(DEBIAN_DIR / "train-labels-idx1-ubyte.gz").long()
    train_idx, val_idx = split_indices(60000, 10000, seed=0)
    assert torch.equal(datamodule.split("val")[1], labels[val_idx])
    assert torch.equal(datamodule.split("train")[1], labels[train_idx])
