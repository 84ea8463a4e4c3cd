"""ImageNet (ILSVRC-2012) from an image-folder layout, through torchvision (the ``vision`` extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from alq_lightning.data.base import DataNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def import_torchvision() -> Any:
    """``torchvision``, or an ImportError that says how to install it."""
    try:
        import torchvision
    except Exception as err:  # a broken install fails with errors other than ImportError too
        raise ImportError(
            f"ImageNetDataModule needs torchvision ({err}); install it with: pip install alq_lightning[vision]"
        ) from err
    return torchvision


class ImageNetDataModule(LightningDataModule):
    """ImageNet read from ``root/{train,val}/<class>/<image>``; ``val`` also serves as the test split.

    Training images get RandomResizedCrop(224) and a horizontal flip; evaluation images Resize(256) and
    CenterCrop(224); all are normalised with the usual ImageNet mean and std. Batches are ``[B, 3, 224, 224]``.
    Lightning adds a DistributedSampler under DDP.

    Args:
        root: folder with ``train/`` and ``val/`` sub-folders of one folder per class.
        batch_size: training batch size per process.
        num_workers: DataLoader worker processes.
        eval_batch_size: validation/test batch size (default ``batch_size``).
        num_classes: classes expected in the folders (1000 for the full data set).
        pin_memory: pin host memory for faster copies to the GPU.
    """

    in_channels = 3
    input_size = 224

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 256,
        num_workers: int = 8,
        eval_batch_size: int | None = None,
        num_classes: int = 1000,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("num_classes", num_classes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be an int >= 0")
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.num_classes, self.pin_memory = num_workers, num_classes, pin_memory
        self.datasets: dict[str, Any] = {}
        self.source_files: list[Path] = []

    def build_transform(self, train: bool) -> Any:
        """The torchvision transform of training (``train=True``) or evaluation images."""
        transforms = import_torchvision().transforms
        if train:
            steps = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
        else:
            steps = [transforms.Resize(256), transforms.CenterCrop(224)]
        return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def setup(self, stage: str | None = None) -> None:
        """Index the image folders (needs torchvision); they are the ``source_files`` of the run."""
        folder_cls = import_torchvision().datasets.ImageFolder
        for split in ("train", "val"):
            if split in self.datasets:
                continue
            folder = self.root / split
            if not folder.is_dir():
                raise DataNotFoundError(
                    f"ImageNet folder {folder} not found; pass root=/path (data.root=... on the command line) "
                    "to a folder with train/<class>/<image> and val/<class>/<image>"
                )
            dataset = folder_cls(str(folder), transform=self.build_transform(train=split == "train"))
            if len(dataset.classes) != self.num_classes:
                raise ValueError(
                    f"{folder} has {len(dataset.classes)} class folders but num_classes={self.num_classes}; "
                    "set num_classes to match the folders"
                )
            self.datasets[split] = dataset
            self.source_files.append(folder)

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches ``([B, 3, 224, 224], [B])``."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in order."""
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        """The validation folder again, as ImageNet's test labels are not public."""
        return self._loader("val", train=False)
