"""LightningDataModules: small data sets held and augmented on the device, ImageNet through torchvision."""
from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule

from alq_lightning.data.base import ChecksumError, DataNotFoundError, TensorDataModule, download_file, split_indices
from alq_lightning.data.cifar import CIFAR10DataModule, read_cifar10
from alq_lightning.data.idx import FashionMNISTDataModule, MNISTDataModule, locate_idx_files, read_idx
from alq_lightning.data.imagenet import ImageNetDataModule
from alq_lightning.data.synthetic import SyntheticDataModule, make_synthetic
from alq_lightning.data.tensor_loader import TensorLoader, crop_and_flip, shard_indices

DATAMODULES: dict[str, type[LightningDataModule]] = {
    "fashion_mnist": FashionMNISTDataModule,
    "mnist": MNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "imagenet": ImageNetDataModule,
    "synthetic": SyntheticDataModule,
}


def build_datamodule(name: str, **kwargs: Any) -> LightningDataModule:
    """The data module called ``name`` (a key of :data:`DATAMODULES`), constructed with ``kwargs``."""
    if name not in DATAMODULES:
        raise ValueError(f"name={name!r} is not a known data set; allowed: {', '.join(DATAMODULES)}")
    return DATAMODULES[name](**kwargs)


__all__ = [
    "DATAMODULES",
    "CIFAR10DataModule",
    "ChecksumError",
    "DataNotFoundError",
    "FashionMNISTDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "TensorDataModule",
    "TensorLoader",
    "build_datamodule",
    "download_file",
    "locate_idx_files",
    "make_synthetic",
    "crop_and_flip",
    "read_cifar10",
    "read_idx",
    "shard_indices",
    "split_indices",
]
