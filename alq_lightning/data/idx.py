"""IDX files (the MNIST format) and the Fashion-MNIST / MNIST data modules that read them."""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

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

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path: str | Path) -> Tensor:
    """Read an IDX file, gzip-compressed or raw (told apart by content, not by name).

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions ``D``, then ``D`` big-endian uint32 sizes and the data.
    Returns a tensor of those sizes and type. Raises ``ValueError`` naming ``path`` if the file is malformed.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt gzip data ({err})") from err
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: IDX header declares {ndim} dimensions but the file is too short for them")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header declares shape {shape} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header} bytes after the header (truncated or corrupt)"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).astype(dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(shape))


@dataclass(frozen=True)
class IdxSource:
    """Where one IDX data set lives: its name, download base URL and MD5s, and standard folders."""

    name: str
    title: str
    url: str
    md5: dict[str, str]
    standard_dirs: tuple[str, ...] = ()
    debian_package: str | None = None
    torchvision_dir: str | None = None


FASHION_MNIST = IdxSource(
    name="fashion_mnist",
    title="Fashion-MNIST",
    url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    md5={
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    standard_dirs=("/usr/share/datasets/fashion-mnist",),
    debian_package="dataset-fashion-mnist",
    torchvision_dir="FashionMNIST",
)

MNIST = IdxSource(
    name="mnist",
    title="MNIST",
    url="https://ossci-datasets.s3.amazonaws.com/mnist/",
    md5={
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    torchvision_dir="MNIST",
)


def list_search_dirs(source: IdxSource, root: str | Path | None) -> list[Path]:
    """Folders searched, in order: ``root`` and torchvision's ``root/<Name>/raw`` when ``root`` is given (and
    nothing else), else the standard folders and the cache."""
    if root is None:
        return [*map(Path, source.standard_dirs), resolve_cache_dir(source.name)]
    root = Path(root).expanduser()
    return [root, *([root / source.torchvision_dir / "raw"] if source.torchvision_dir else [])]


def find_idx_files(source: IdxSource, root: str | Path | None = None) -> dict[str, Path] | None:
    """The four IDX files (``.gz`` or raw) from the first candidate folder that holds all of them, or None."""
    for folder in list_search_dirs(source, root):
        found = {}
        for stem in IDX_FILES:
            path = next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)
            if path is None:
                break
            found[stem] = path
        else:
            return found
    return None


def download_idx_files(source: IdxSource, folder: Path) -> dict[str, Path]:
    """Download the four ``.gz`` files into ``folder`` (skipping those already there), checking their MD5s."""
    files = {}
    for stem in IDX_FILES:
        name = f"{stem}.gz"
        dest = folder / name
        if not dest.is_file():
            download_file(source.url + name, dest, md5=source.md5[name])
        files[stem] = dest
    return files


def locate_idx_files(source: IdxSource, root: str | Path | None = None, download: bool = True) -> dict[str, Path]:
    """Find the IDX files of ``source``: in ``root`` alone when it is given (downloaded into it when allowed
    and the folder exists), else in the standard folders or the cache (downloaded into the cache when allowed).

    Raises :class:`DataNotFoundError` saying where it looked and how to provide the files.
    """
    found = find_idx_files(source, root)
    if found is not None:
        return found
    target = Path(root).expanduser() if root is not None else resolve_cache_dir(source.name)
    if root is not None and not target.is_dir():
        reason = f"root={str(root)!r} does not exist"
    elif not download:
        reason = "download disabled (download=False)"
    else:
        try:
            return download_idx_files(source, target)
        except (OSError, ValueError) as err:
            reason = f"download into {target} failed: {err}"
    looked = "\n".join(f"  - {d}" for d in list_search_dirs(source, root))
    names = ", ".join(IDX_FILES)
    if root is not None:
        elsewhere = " or ".join([*source.standard_dirs, "the cache"])
        raise DataNotFoundError(
            f"{source.title}: data root {target} cannot serve; {reason}.\nExpected {names} (.gz or raw) in:\n"
            f"{looked}\nPut them there, allow the download into an existing root (download=True), or leave root "
            f"unset (data.root=null) to use {elsewhere}"
        )
    ways = [f"pass root=/path/to/folder (data.root=... on the command line) holding {names} (.gz or raw)"]
    if source.debian_package:
        ways.append(
            f"install Debian's {source.debian_package} package (apt-get install {source.debian_package}), "
            f"which puts them in {source.standard_dirs[0]}"
        )
    ways.append(f"allow the download (download=True) on a machine with network access to {source.url}")
    numbered = "\n".join(f"  {i}. {way}" for i, way in enumerate(ways, 1))
    raise DataNotFoundError(
        f"{source.title} files not found; {reason}.\nLooked in:\n{looked}\n"
        f"Provide them in one of these ways:\n{numbered}"
    )


class IdxDataModule(TensorDataModule):
    """A 28x28 grey-scale IDX data set (60 000 training, 10 000 test images) held on the device.

    Args:
        root: folder holding the IDX files (or ``<Name>/raw`` under it), the only one searched when given;
            None searches the standard folders and the cache.
        batch_size, val_size, seed: see :class:`TensorDataModule`.
        download: fetch the official files into ``root`` (when it exists) or the cache when they are not found.
        **kwargs: further :class:`TensorDataModule` arguments (``train_limit``, ``eval_batch_size``, ...).
    """

    source: IdxSource
    num_classes = 10
    in_channels = 1
    input_size = 28

    def __init__(
        self,
        root: str | Path | None = None,
        batch_size: int = 128,
        val_size: int = 10000,
        seed: int = 0,
        download: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, val_size=val_size, seed=seed, **kwargs)
        self.save_hyperparameters(logger=False)
        self.root, self.download = root, download

    def prepare_data(self) -> None:
        """Find (or download) the files once per node."""
        locate_idx_files(self.source, self.root, self.download)

    def _read_pair(self, prefix: str) -> tuple[Tensor, Tensor]:
        files = locate_idx_files(self.source, self.root, self.download)
        image_file, label_file = files[f"{prefix}-images-idx3-ubyte"], files[f"{prefix}-labels-idx1-ubyte"]
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{image_file} holds shape {tuple(images.shape)} and {label_file} shape {tuple(labels.shape)}; "
                "expected [N, H, W] images and [N] labels"
            )
        check_labels(labels, self.num_classes, str(label_file))
        self.source_files += [image_file, label_file]
        return images.unsqueeze(1), labels.long()

    def load_train(self) -> tuple[Tensor, Tensor]:
        """uint8 images ``[60000, 1, 28, 28]`` and labels ``[60000]``."""
        return self._read_pair("train")

    def load_test(self) -> tuple[Tensor, Tensor]:
        """uint8 images ``[10000, 1, 28, 28]`` and labels ``[10000]``."""
        return self._read_pair("t10k")


class FashionMNISTDataModule(IdxDataModule):
    """Fashion-MNIST (Zalando): 10 clothing classes; normalised with mean 0.2860, std 0.3530."""

    source = FASHION_MNIST
    mean = (0.2860,)
    std = (0.3530,)


class MNISTDataModule(IdxDataModule):
    """MNIST hand-written digits; normalised with mean 0.1307, std 0.3081."""

    source = MNIST
    mean = (0.1307,)
    std = (0.3081,)
