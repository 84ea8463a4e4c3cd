"""ImageNetDataModule's own logic, run without torchvision: a stand-in ``torchvision`` module records what the
reader asks of it. Folder scanning and class indexing are torchvision's ``ImageFolder`` (the stand-in lists class
folders the way it does); what is tested is the reader's side: which folders it opens with which transform, its
errors, its caching and its loaders."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from alq_lightning.data import ImageNetDataModule
from alq_lightning.data.base import DataNotFoundError
from alq_lightning.data.imagenet import IMAGENET_MEAN, IMAGENET_STD


class Step:
    """A transform of the stand-in: remembers its name and arguments."""

    def __init__(self, *args) -> None:
        self.args = args

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.args == other.args

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.args}"


class ImageFolder(torch.utils.data.Dataset):
    """Stand-in: classes are the sorted sub-folders of ``root``, one sample per file; items are not decoded."""

    built: list[str] = []

    def __init__(self, root: str, transform=None) -> None:
        self.root, self.transform = Path(root), transform
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.samples = [(f, i) for i, c in enumerate(self.classes) for f in sorted((self.root / c).iterdir())]
        ImageFolder.built.append(root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return torch.zeros(3, 224, 224), self.samples[index][1]


@pytest.fixture
def fake_torchvision(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    names = ("Compose", "RandomResizedCrop", "RandomHorizontalFlip", "Resize", "CenterCrop", "ToTensor", "Normalize")
    transforms = types.SimpleNamespace(**{name: type(name, (Step,), {}) for name in names})
    module = types.ModuleType("torchvision")
    module.transforms, module.datasets = transforms, types.SimpleNamespace(ImageFolder=ImageFolder)
    monkeypatch.setitem(sys.modules, "torchvision", module)
    ImageFolder.built = []
    return module


def make_folders(root: Path, splits=("train", "val"), classes=("a", "b", "c"), images: int = 3) -> None:
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(images):
                (root / split / cls / f"{i}.JPEG").write_bytes(b"")


def test_each_split_opens_its_folder_with_its_transform(tmp_path, fake_torchvision):
    """train/ gets RandomResizedCrop(224) + flip, val/ Resize(256) + CenterCrop(224), both ToTensor and the
    ImageNet normalisation; setup() again builds nothing new."""
    make_folders(tmp_path)
    dm = ImageNetDataModule(root=tmp_path, num_classes=3, num_workers=0, pin_memory=False)
    dm.setup()
    dm.setup("test")
    t = fake_torchvision.transforms
    assert ImageFolder.built == [str(tmp_path / "train"), str(tmp_path / "val")]
    tail = [t.ToTensor(), t.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    assert dm.datasets["train"].transform == t.Compose([t.RandomResizedCrop(224), t.RandomHorizontalFlip(), *tail])
    assert dm.datasets["val"].transform == t.Compose([t.Resize(256), t.CenterCrop(224), *tail])


def test_loaders_batch_shuffle_and_test_is_val(tmp_path, fake_torchvision):
    """Training: shuffled, ``batch_size``, last partial batch dropped; validation and test: the val folder in
    order at ``eval_batch_size``; loaders set themselves up when setup() was not called."""
    make_folders(tmp_path)
    dm = ImageNetDataModule(root=tmp_path, batch_size=4, eval_batch_size=5, num_classes=3, num_workers=0,
                            pin_memory=False)
    train, val, test = dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()
    assert isinstance(train.sampler, RandomSampler) and train.batch_size == 4 and train.drop_last
    assert len(list(train)) == 9 // 4
    for loader in (val, test):
        assert isinstance(loader.sampler, SequentialSampler) and loader.batch_size == 5 and not loader.drop_last
        assert loader.dataset is dm.datasets["val"]
        assert [labels.tolist() for _, labels in loader] == [[0, 0, 0, 1, 1], [1, 2, 2, 2]]


@pytest.mark.parametrize("missing", ["train", "val"])
def test_missing_split_folder_names_it_and_data_root(tmp_path, fake_torchvision, missing):
    """A missing split folder raises DataNotFoundError naming the folder and ``data.root=``."""
    make_folders(tmp_path, splits=[s for s in ("train", "val") if s != missing])
    with pytest.raises(DataNotFoundError, match=re.escape(f"{tmp_path / missing} not found") + r".*data\.root="):
        ImageNetDataModule(root=tmp_path, num_classes=3, num_workers=0).setup()


def test_class_count_must_match_num_classes(tmp_path, fake_torchvision):
    """Class folders other than ``num_classes`` are refused with both numbers."""
    make_folders(tmp_path, classes=("a", "b"))
    with pytest.raises(ValueError, match=r"2 class folders but num_classes=3"):
        ImageNetDataModule(root=tmp_path, num_classes=3, num_workers=0).setup()
