"""A generic image-classification LightningModule around any ``nn.Module`` classifier."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

OPTIMIZERS = ("sgd", "adam")


def check_number(name: str, value: Any, ok: Callable[[float], bool], allowed: str) -> None:
    """Raise ``ValueError`` naming ``name``, ``value`` and ``allowed`` unless ``value`` is a real with ``ok(value)``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not ok(value):
        raise ValueError(f"{name}={value!r} must be a number {allowed}")


def is_plain(value: Any) -> bool:
    """Whether ``value`` is made of str, int, float, bool, None, lists, tuples and dicts with str keys: what a
    checkpoint holds and ``torch.load(weights_only=True)`` reads back."""
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_plain(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_plain(item) for item in value)
    return value is None or isinstance(value, (str, int, float))


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of ``model`` with top-1 accuracy, on ``(x, y)`` batches.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.

    Args:
        model: maps ``x`` ``[B, ...]`` to logits ``[B, num_classes]``.
        num_classes: number of classes (>= 2); ``y`` is ``[B]`` int64 in ``[0, num_classes)``.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        lr: learning rate (> 0).
        momentum: SGD momentum in ``[0, 1)``; unused by Adam.
        weight_decay: L2 penalty (>= 0).
        lr_milestones: epochs at which the learning rate is multiplied by ``lr_gamma`` (strictly increasing,
            positive); empty for a constant learning rate.
        lr_gamma: the multiplicative decay at each milestone (> 0).
        architecture: how ``model`` is built, saved with the hyper-parameters so that a checkpoint can be
            rebuilt without the code that made it: :func:`alq_lightning.models.build_model` arguments
            (``name``, ``in_channels``, ``num_classes``, ``input_size`` and constructor options such as
            ``width``) made of plain values (:func:`is_plain`); None when ``model`` was built otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.5,
        weight_decay: float = 0.0,
        lr_milestones: Sequence[int] = (),
        lr_gamma: float = 0.2,
        architecture: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={type(model).__name__} must be a torch.nn.Module")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
        check_number("lr", lr, lambda v: v > 0, "> 0")
        check_number("momentum", momentum, lambda v: 0 <= v < 1, "in [0, 1)")
        check_number("weight_decay", weight_decay, lambda v: v >= 0, ">= 0")
        check_number("lr_gamma", lr_gamma, lambda v: v > 0, "> 0")
        milestones = list(lr_milestones)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones) or any(
            a >= b for a, b in zip(milestones, milestones[1:])
        ):
            raise ValueError(f"lr_milestones={milestones!r} must be strictly increasing positive integers")
        if architecture is not None and not (
            isinstance(architecture, dict) and isinstance(architecture.get("name"), str) and is_plain(architecture)
        ):
            raise ValueError(f"architecture={architecture!r} must be None or a dict of build_model arguments with a "
                             "'name', made of strings, numbers, None, lists and dicts with string keys")
        if architecture is not None and architecture.get("num_classes", num_classes) != num_classes:
            raise ValueError(f"architecture={architecture!r} has num_classes={architecture['num_classes']!r}, the "
                             f"module num_classes={num_classes}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.lr_milestones = milestones
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` -> logits ``[B, num_classes]``."""
        return self.model(x)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric: MulticlassAccuracy = getattr(self, f"{stage}_acc")
        metric(logits, y)
        on_step = stage == "train"
        kwargs: dict[str, Any] = dict(on_step=on_step, on_epoch=True, batch_size=y.shape[0])
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=not on_step, **kwargs)
        self.log(f"{stage}/acc", metric, prog_bar=stage != "train", **kwargs)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if not self.lr_milestones:
            return optimizer
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.lr_milestones, gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
