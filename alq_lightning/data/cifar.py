"""CIFAR-10 from the official python-pickle files, held on the device and augmented there."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from alq_lightning.data.base import (
    DataNotFoundError,
    TensorDataModule,
    check_labels,
    download_file,
    resolve_cache_dir,
)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
CIFAR10_CLASSES = 10

_ALLOWED_GLOBALS = {
    *((f"numpy.{core}.{module}", name) for core in ("core", "_core")
      for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, never arbitrary callables."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def read_cifar_batch(stream: IO[bytes], name: str) -> tuple[Tensor, Tensor]:
    """One pickled batch (``{b'data': uint8 [N, 3072], b'labels': [N]}``) as images ``[N, 3, 32, 32]`` uint8
    and labels ``[N]`` int64. Raises ``ValueError`` naming ``name`` if it is malformed."""
    try:
        batch = _BatchUnpickler(stream, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{name}: not a CIFAR python batch ({err!r})") from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise ValueError(f"{name}: data shape {data.shape} and labels shape {labels.shape}; expected [N, 3072] and [N]")
    labels = torch.from_numpy(labels)
    check_labels(labels, CIFAR10_CLASSES, name)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def read_cifar10(path: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """Read ``cifar-10-python.tar.gz`` or an extracted ``cifar-10-batches-py`` folder.

    Returns ``{"train": (uint8 [50000, 3, 32, 32], int64 [50000]), "test": (uint8 [10000, ...], [10000])}``
    (fewer samples for smaller files written in the same format). Labels outside ``[0, 10)`` raise ValueError.
    """
    path = Path(path)
    names = {"train": TRAIN_BATCHES, "test": (TEST_BATCH,)}
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {"train": [], "test": []}
    if path.is_dir():
        for split, batches in names.items():
            for batch in batches:
                with open(path / batch, "rb") as stream:
                    parts[split].append(read_cifar_batch(stream, str(path / batch)))
    else:
        try:
            with tarfile.open(path, "r:*") as archive:
                members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
                for split, batches in names.items():
                    for batch in batches:
                        if batch not in members:
                            raise ValueError(f"{path}: archive has no member {FOLDER}/{batch}")
                        stream = archive.extractfile(members[batch])
                        data = stream.read() if stream is not None else b""
                        parts[split].append(read_cifar_batch(io.BytesIO(data), f"{path}:{batch}"))
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"{path}: not a readable CIFAR-10 archive ({err})") from err
    return {split: (torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps])) for split, ps in parts.items()}


def data_folder(root: str | Path | None) -> Path:
    """``root`` when given (the only folder searched), else the cache folder."""
    return Path(root).expanduser() if root is not None else resolve_cache_dir("cifar10")


def find_cifar10(root: str | Path | None = None) -> Path | None:
    """The extracted folder or the archive in :func:`data_folder`, or None."""
    folder = data_folder(root)
    for candidate in (folder / FOLDER, folder, folder / ARCHIVE):
        is_folder = candidate.is_dir() and (candidate / TRAIN_BATCHES[0]).is_file()
        if is_folder or (candidate.suffix == ".gz" and candidate.is_file()):
            return candidate
    return None


def locate_cifar10(root: str | Path | None = None, download: bool = True) -> Path:
    """Find CIFAR-10 in ``root`` alone when it is given (downloaded into it when allowed and the folder exists),
    else in the cache (downloaded there when allowed).

    Raises :class:`DataNotFoundError` saying where it looked and how to provide the files.
    """
    found = find_cifar10(root)
    if found is not None:
        return found
    folder = data_folder(root)
    if root is not None and not folder.is_dir():
        reason = f"root={str(root)!r} does not exist"
    elif not download:
        reason = "download disabled (download=False)"
    else:
        try:
            return download_file(CIFAR10_URL, folder / ARCHIVE, md5=CIFAR10_MD5)
        except (OSError, ValueError) as err:
            reason = f"download into {folder / ARCHIVE} failed: {err}"
    if root is not None:
        raise DataNotFoundError(
            f"CIFAR-10: data root {folder} cannot serve; {reason}.\nExpected {folder / ARCHIVE} or "
            f"{folder / FOLDER}/ (or the batch files in {folder}).\nPut them there, allow the download into an "
            "existing root (download=True), or leave root unset (data.root=null) to use the cache"
        )
    raise DataNotFoundError(
        f"CIFAR-10 not found; {reason}.\nLooked in: {folder} for {FOLDER}/ or {ARCHIVE}.\n"
        "Provide it in one of these ways:\n"
        f"  1. pass root=/path/to/folder (data.root=... on the command line) holding {ARCHIVE} or {FOLDER}/\n"
        f"  2. allow the download (download=True) on a machine with network access to {CIFAR10_URL}"
    )


class CIFAR10DataModule(TensorDataModule):
    """CIFAR-10 (50 000 training, 10 000 test images, 3x32x32, 10 classes) held on the device.

    Training batches are randomly cropped (padding 4) and flipped on the device when ``augment``.

    Args:
        root: folder holding ``cifar-10-python.tar.gz`` or ``cifar-10-batches-py/``, the only one searched when
            given; None searches the cache.
        batch_size, val_size, seed, augment: see :class:`TensorDataModule`.
        download: fetch the official archive into ``root`` (when it exists) or the cache when it is not found.
        **kwargs: further :class:`TensorDataModule` arguments (``train_limit``, ``eval_batch_size``, ...).
    """

    num_classes = 10
    in_channels = 3
    input_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        root: str | Path | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        download: bool = True,
        augment: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, val_size=val_size, seed=seed, augment=augment, **kwargs)
        self.save_hyperparameters(logger=False)
        self.root, self.download = root, download
        self._data: dict[str, tuple[Tensor, Tensor]] | None = None

    def prepare_data(self) -> None:
        """Find (or download) the archive once per node."""
        locate_cifar10(self.root, self.download)

    def _take(self, split: str) -> tuple[Tensor, Tensor]:
        if self._data is None or split not in self._data:
            path = locate_cifar10(self.root, self.download)
            self._data = read_cifar10(path)
            self.source_files.append(path)
        return self._data.pop(split)

    def load_train(self) -> tuple[Tensor, Tensor]:
        """uint8 images ``[50000, 3, 32, 32]`` and labels ``[50000]``."""
        return self._take("train")

    def load_test(self) -> tuple[Tensor, Tensor]:
        """uint8 images ``[10000, 3, 32, 32]`` and labels ``[10000]``."""
        return self._take("test")
