"""Shared pieces of the data modules: the tensor-held DataModule base, splits, cache dir, checked downloads."""
from __future__ import annotations

import hashlib
import os
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor

from alq_lightning.data.tensor_loader import TensorLoader
from alq_lightning.files import write_atomic


class DataNotFoundError(FileNotFoundError):
    """A data set's files are nowhere to be found and could not be downloaded."""


class ChecksumError(ValueError):
    """A downloaded file does not have the published checksum."""


def resolve_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/alq_lightning/<name>`` (``~/.cache`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "alq_lightning" / name


def fetch_chunks(url: str, timeout: float = 60.0) -> tuple[int | None, Iterator[bytes]]:
    """Open ``url``; return its announced size in bytes (None if unknown) and an iterator over its bytes."""
    response = urllib.request.urlopen(url, timeout=timeout)
    size = response.headers.get("Content-Length")

    def chunks() -> Iterator[bytes]:
        with response:
            while chunk := response.read(1 << 20):
                yield chunk

    return (int(size) if size else None), chunks()


def download_file(url: str, dest: Path, *, md5: str | None = None, sha256: str | None = None) -> Path:
    """Download ``url`` to ``dest`` with a progress bar, checking its MD5 and/or SHA-256.

    The bytes go through :func:`alq_lightning.files.write_atomic`: ``dest`` appears only once the checksum
    matches, never half-written. Raises :class:`ChecksumError` on a mismatch and ``OSError`` (``URLError``)
    when the fetch fails.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(out: BinaryIO) -> None:
        digests = {name: hashlib.new(name) for name, want in (("md5", md5), ("sha256", sha256)) if want}
        with Progress(TextColumn(f"downloading {dest.name}"), BarColumn(), DownloadColumn(),
                      TransferSpeedColumn()) as progress:
            size, chunks = fetch_chunks(url)
            task = progress.add_task("download", total=size)
            for chunk in chunks:
                out.write(chunk)
                for digest in digests.values():
                    digest.update(chunk)
                progress.advance(task, len(chunk))
        for name, want in (("md5", md5), ("sha256", sha256)):
            if want and digests[name].hexdigest() != want.lower():
                raise ChecksumError(
                    f"{url}: {name} {digests[name].hexdigest()} differs from the published {want}; file discarded"
                )

    return write_atomic(dest, fetch)


def split_indices(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split of ``range(n)`` into sorted train ``[n - val_size]`` and validation ``[val_size]`` indices."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size={val_size} must be in [0, {n}) for a training set of {n} samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def check_labels(labels: Tensor, num_classes: int, source: str) -> None:
    """ValueError naming ``source``, the first bad value and the allowed range unless ``labels`` ``[N]`` are
    integers in ``[0, num_classes)``."""
    if labels.is_floating_point():
        raise ValueError(f"{source}: labels are {labels.dtype}; expected integers in [0, {num_classes - 1}]")
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if bad.numel():
        index = int(bad[0, 0])
        raise ValueError(f"{source}: label {int(labels[index])} at index {index} is outside [0, {num_classes - 1}] "
                         f"({num_classes} classes)")


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r} must be None or a positive int")


class TensorDataModule(LightningDataModule, ABC):
    """A small data set held as tensors on the training device and batched there by :class:`TensorLoader`.

    Subclasses set ``num_classes``, ``in_channels``, ``input_size``, ``mean`` and ``std`` (per channel) and
    implement :meth:`load_train` / :meth:`load_test`, which add the paths they read to ``source_files``.
    Images ``[N, C, H, W]`` come back from them as uint8 (scaled to [0, 1] and normalised here) or as float
    (taken as already normalised); labels ``[N]``.

    Args:
        batch_size: training batch size per rank.
        val_size: training samples held out for validation by a split seeded with ``seed``.
        seed: seed of the split, the shuffling and the augmentation.
        eval_batch_size: validation/test batch size (default ``batch_size``).
        train_limit, val_limit, test_limit: use only the first so many samples of a split (smoke runs).
        augment: random crop (with ``padding``) and horizontal flip of training batches, on the device.
        padding: crop padding in pixels; padded pixels are black.
    """

    num_classes: int
    in_channels: int
    input_size: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __init__(
        self,
        batch_size: int = 128,
        val_size: int = 0,
        seed: int = 0,
        *,
        eval_batch_size: int | None = None,
        train_limit: int | None = None,
        val_limit: int | None = None,
        test_limit: int | None = None,
        augment: bool = False,
        padding: int = 4,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int")
        if eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size < 1):
            raise ValueError(f"eval_batch_size={eval_batch_size!r} must be None or a positive int")
        if not isinstance(val_size, int) or val_size < 0:
            raise ValueError(f"val_size={val_size!r} must be an int >= 0")
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding={padding!r} must be an int >= 0")
        for name, value in (("train_limit", train_limit), ("val_limit", val_limit), ("test_limit", test_limit)):
            _check_limit(name, value)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.val_size, self.seed = val_size, seed
        self.limits = {"train": train_limit, "val": val_limit, "test": test_limit}
        self.augment, self.padding = augment, padding
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}
        self.source_files: list[Path] = []

    @abstractmethod
    def load_train(self) -> tuple[Tensor, Tensor]:
        """The whole training set: images ``[N, C, H, W]`` (uint8 or normalised float), labels ``[N]``."""

    @abstractmethod
    def load_test(self) -> tuple[Tensor, Tensor]:
        """The test set: images ``[M, C, H, W]`` (uint8 or normalised float), labels ``[M]``."""

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 ``[N, C, H, W]`` to float32 scaled to [0, 1] and normalised per channel; floats pass through."""
        if images.is_floating_point():
            return images
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (images.float().div_(255.0) - mean) / std

    def setup(self, stage: str | None = None) -> None:
        """Load, normalise and split the splits ``stage`` needs (once), on the trainer's device."""
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for name in needed.get(stage or "", ("train", "val", "test")):
            self.split(name)

    @property
    def device(self) -> torch.device:
        """The trainer's root device, or the CPU without a trainer."""
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _load_train(self) -> None:
        images, labels = self.load_train()
        images, labels = self.normalize(images), labels.long()
        train_idx, val_idx = split_indices(images.shape[0], self.val_size, self.seed)
        self._splits["train"] = (images[train_idx], labels[train_idx])
        self._splits["val"] = (images[val_idx], labels[val_idx])

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """Images ``[N, C, H, W]`` float and labels ``[N]`` int64 of split ``train``, ``val`` or ``test``, limited
        by its ``*_limit`` and moved to :attr:`device`."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split name={name!r} is unknown; allowed: train, val, test")
        if name not in self._splits:
            if name == "test":
                images, labels = self.load_test()
                self._splits["test"] = (self.normalize(images), labels.long())
            else:
                self._load_train()
        images, labels = self._splits[name]
        limit = self.limits[name]
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        device = self.device
        if images.device != device:
            images, labels = images.to(device), labels.to(device)
            self._splits[name] = (images, labels)
        return images, labels

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, name: str, train: bool) -> TensorLoader:
        images, labels = self.split(name)
        rank, world_size = self._rank_world()
        fill = (-torch.tensor(self.mean) / torch.tensor(self.std)).expand(images.shape[1])
        return TensorLoader(
            images,
            labels,
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            augment=train and self.augment,
            padding=self.padding,
            fill=fill,
        )

    def train_dataloader(self) -> TensorLoader:
        """Shuffled, augmented (if enabled) training batches of this rank's shard, last partial batch dropped."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> TensorLoader:
        """Validation batches in order (this rank's shard)."""
        return self._loader("val", train=False)

    def test_dataloader(self) -> TensorLoader:
        """Test batches in order (this rank's shard)."""
        return self._loader("test", train=False)
