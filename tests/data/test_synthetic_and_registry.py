"""Synthetic data, ImageNet folders, and a Lightning fit that drives the loader's epochs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from alq_lightning.data import (
    ImageNetDataModule,
    SyntheticDataModule,
    TensorLoader,
    make_synthetic,
)


def test_synthetic_is_deterministic_from_its_seed() -> None:
    a = SyntheticDataModule(num_classes=5, in_channels=2, input_size=6, train_size=30, val_size=10, test_size=8, seed=1)
    b = SyntheticDataModule(num_classes=5, in_channels=2, input_size=6, train_size=30, val_size=10, test_size=8, seed=1)
    c = SyntheticDataModule(num_classes=5, in_channels=2, input_size=6, train_size=30, val_size=10, test_size=8, seed=2)
    for dm in (a, b, c):
        dm.setup()
    assert (a.num_classes, a.in_channels, a.input_size) == (5, 2, 6)
    for split in ("train", "val", "test"):
        assert all(torch.equal(x, y) for x, y in zip(a.split(split), b.split(split)))
    assert not torch.equal(a.split("train")[0], c.split("train")[0])
    assert a.split("train")[0].shape == (30, 2, 6, 6) and a.split("test")[0].shape == (8, 2, 6, 6)


def test_synthetic_labels_are_a_fixed_function_of_the_images() -> None:
    images, labels = make_synthetic(2000, 4, 1, 8, seed=0)
    assert labels.bincount(minlength=4).min() > 200
    pooled = nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)
    probe = nn.Linear(16, 4)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(probe(pooled * 8), labels).backward()
        optimizer.step()
    assert (probe(pooled * 8).argmax(1) == labels).float().mean() > 0.9


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_imagenet_without_torchvision_says_how_to_install_it(tmp_path: Path) -> None:
    dm = ImageNetDataModule(root=tmp_path)
    with pytest.raises(ImportError, match=r"pip install alq_lightning\[vision\]"):
        dm.setup()


def test_imagenet_reads_an_image_folder(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    image_cls = pytest.importorskip("PIL.Image")
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                image_cls.new("RGB", (300, 260), (40 * i, 90, 200)).save(tmp_path / split / cls / f"{i}.png")
    dm = ImageNetDataModule(root=tmp_path, batch_size=2, num_workers=0, num_classes=2, pin_memory=False)
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 224, 224) and labels.shape == (2,)
    assert next(iter(dm.test_dataloader()))[0].shape == (2, 3, 224, 224)
    with pytest.raises(ValueError, match="num_classes=5"):
        ImageNetDataModule(root=tmp_path, num_classes=5, num_workers=0).setup()


class _Probe(L.LightningModule):
    """Records the labels of every training batch per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
        self.epochs: list[list[torch.Tensor]] = []

    def on_train_epoch_start(self) -> None:
        self.epochs.append([])

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.epochs[-1].append(labels)
        return nn.functional.cross_entropy(self.net(images), labels)

    def validation_step(self, batch, batch_idx) -> None:
        self.log("val/acc", (self.net(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_sets_the_loader_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bool, int]] = []
    set_epoch = TensorLoader.set_epoch
    def spy(self: TensorLoader, epoch: int) -> None:
        calls.append((self.shuffle, epoch))
        set_epoch(self, epoch)

    monkeypatch.setattr(TensorLoader, "set_epoch", spy)
    dm = SyntheticDataModule(input_size=4, train_size=64, val_size=16, test_size=16, batch_size=16, seed=3)
    probe = _Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(probe, dm)
    loader = trainer.train_dataloader
    assert [e for shuffle, e in calls if shuffle] == [0, 1] and loader.epoch == 2
    for epoch, seen in enumerate(probe.epochs):
        indices = loader.plan_epoch(epoch)[0]
        assert torch.equal(torch.cat(seen), dm.split("train")[1][indices])
