"""LightningDataModules: small data sets held and augmented on the device, ImageNet through torchvision.

The app builds them from ``conf/data/*.yaml`` (``_target_: alq_lightning.data.<Class>``)."""
from __future__ import annotations

from alq_lightning.data.base import ChecksumError, DataNotFoundError, TensorDataModule, download_file, split_indices
from alq_lightning.data.cifar import CIFAR10DataModule, read_cifar10
from alq_lightning.data.idx import FashionMNISTDataModule, MNISTDataModule, locate_idx_files, read_idx
from alq_lightning.data.imagenet import ImageNetDataModule
from alq_lightning.data.synthetic import SyntheticDataModule, make_synthetic
from alq_lightning.data.tensor_loader import TensorLoader, crop_and_flip, shard_indices

__all__ = [
    "CIFAR10DataModule",
    "ChecksumError",
    "DataNotFoundError",
    "FashionMNISTDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "TensorDataModule",
    "TensorLoader",
    "download_file",
    "locate_idx_files",
    "make_synthetic",
    "crop_and_flip",
    "read_cifar10",
    "read_idx",
    "shard_indices",
    "split_indices",
]
