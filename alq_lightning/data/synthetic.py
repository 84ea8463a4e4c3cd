"""A learnable synthetic data set of any image shape, fully determined by its seed."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alq_lightning.data.base import TensorDataModule


def make_synthetic(
    num_samples: int, num_classes: int, in_channels: int, input_size: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Gaussian images ``[num_samples, C, S, S]`` and labels ``[num_samples]`` that a network can learn.

    The label is the argmax of a fixed random linear map (drawn from ``seed``) of the image average-pooled
    to at most 4x4, so it depends on coarse spatial structure that convolutions and pooling pick up.
    """
    generator = torch.Generator().manual_seed(seed)
    pooled_size = min(4, input_size)
    projection = torch.randn(num_classes, in_channels * pooled_size**2, generator=generator)
    images = torch.randn(num_samples, in_channels, input_size, input_size, generator=generator)
    pooled = F.adaptive_avg_pool2d(images, pooled_size).flatten(1)
    return images, (pooled @ projection.T).argmax(dim=1)


class SyntheticDataModule(TensorDataModule):
    """Synthetic images held on the device (see :func:`make_synthetic`), for shape coverage and smoke runs.

    Args:
        num_classes, in_channels, input_size: shape of the task; images are ``[N, in_channels, S, S]``.
        train_size: training samples (after the validation split).
        test_size: test samples, drawn from the same distribution.
        val_size: validation samples, split off ``train_size + val_size`` generated ones.
        seed: seed of the data and of :class:`TensorDataModule`'s split, shuffling and augmentation.
        batch_size: training batch size.
        **kwargs: further :class:`TensorDataModule` arguments.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        train_size: int = 512,
        test_size: int = 256,
        val_size: int = 128,
        seed: int = 0,
        batch_size: int = 64,
        **kwargs,
    ) -> None:
        for name, value, low in (
            ("num_classes", num_classes, 2),
            ("in_channels", in_channels, 1),
            ("input_size", input_size, 1),
            ("train_size", train_size, 1),
            ("test_size", test_size, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an int >= {low}")
        super().__init__(batch_size=batch_size, val_size=val_size, seed=seed, **kwargs)
        self.save_hyperparameters(logger=False)
        self.num_classes, self.in_channels, self.input_size = num_classes, in_channels, input_size
        self.train_size, self.test_size = train_size, test_size
        self._generated: dict[str, tuple[Tensor, Tensor]] = {}

    def _take(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in self._generated:
            images, labels = make_synthetic(
                self.train_size + self.val_size + self.test_size,
                self.num_classes,
                self.in_channels,
                self.input_size,
                self.seed,
            )
            n = self.train_size + self.val_size
            self._generated = {"train": (images[:n], labels[:n]), "test": (images[n:], labels[n:])}
        return self._generated.pop(split)

    def load_train(self) -> tuple[Tensor, Tensor]:
        """float images ``[train_size + val_size, C, S, S]`` and labels."""
        return self._take("train")

    def load_test(self) -> tuple[Tensor, Tensor]:
        """float images ``[test_size, C, S, S]`` and labels."""
        return self._take("test")
