"""A generic image-classification LightningModule around any ``nn.Module`` classifier."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torchmetrics.classification import MulticlassAccuracy

from .activations import CHECKPOINT_KEY, has_input_quantizer

SCHEDULER_INTERVALS = ("epoch", "step")


def default_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """SGD at learning rate 0.01 with momentum 0.5 (the authors' LeNet5 recipe): the optimizer of a
    ``ClassifierModule`` given none."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.5)


def is_plain(value: Any) -> bool:
    """Whether ``value`` is made of str, int, float, bool, None, lists, tuples and dicts with str keys: what a
    checkpoint holds and ``torch.load(weights_only=True)`` reads back."""
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_plain(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_plain(item) for item in value)
    return value is None or isinstance(value, (str, int, float))


def check_optimizer_factories(optimizer: Any, scheduler: Any, interval: Any) -> None:
    """Build ``optimizer`` (and ``scheduler`` on it) once on a probe parameter, so that a bad partial fails in the
    constructor, naming the argument, its value and what is allowed, rather than at the first training step."""
    if not callable(optimizer):
        raise ValueError(f"optimizer={optimizer!r} must be a callable params -> torch.optim.Optimizer, e.g. "
                         "functools.partial(torch.optim.SGD, lr=0.1) (a `_partial_: true` config)")
    try:
        built = optimizer([nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as err:
        raise ValueError(f"optimizer={optimizer!r} cannot build an optimizer: {err}") from err
    if not isinstance(built, torch.optim.Optimizer):
        raise ValueError(f"optimizer={optimizer!r} returned {type(built).__name__}; it must return a "
                         "torch.optim.Optimizer")
    if interval not in SCHEDULER_INTERVALS:
        raise ValueError(f"scheduler_interval={interval!r} is not allowed; allowed: {', '.join(SCHEDULER_INTERVALS)}")
    if scheduler is None:
        return
    if not callable(scheduler):
        raise ValueError(f"scheduler={scheduler!r} must be None or a callable optimizer -> learning-rate scheduler, "
                         "e.g. functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[15])")
    try:
        scheduler(built)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"scheduler={scheduler!r} cannot build a scheduler: {err}") from err


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of ``net`` with top-1 accuracy, on ``(x, y)`` batches.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.

    Args:
        net: maps ``x`` ``[B, ...]`` to logits ``[B, num_classes]``; held as ``self.model``, so that checkpoint
            keys read ``model.<parameter>``.
        num_classes: number of classes (>= 2); ``y`` is ``[B]`` int64 in ``[0, num_classes)``.
        optimizer: ``params -> torch.optim.Optimizer``, e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)``
            (in Hydra: a ``_partial_: true`` config); it gets the parameters that require a gradient.
            Default: SGD, lr 0.01, momentum 0.5.
        scheduler: ``optimizer -> LRScheduler``, e.g. ``functools.partial(MultiStepLR, milestones=[15],
            gamma=0.2)``; None for a constant learning rate.
        scheduler_interval: when the scheduler steps: ``"epoch"`` or ``"step"``.
        architecture: how ``net`` is built, saved with the hyper-parameters so that a checkpoint can be
            rebuilt without the code that made it: :func:`alq_lightning.models.build_model` arguments
            (``name``, ``in_channels``, ``num_classes``, ``input_size`` and constructor options such as
            ``width``) made of plain values (:func:`is_plain`); None when ``net`` was built otherwise.

    The optimizer and scheduler factories are left out of the saved hyper-parameters: a checkpoint holds plain
    values only, readable with ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer] = default_optimizer,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        scheduler_interval: str = "epoch",
        architecture: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ValueError(f"net={type(net).__name__} must be a torch.nn.Module")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2")
        check_optimizer_factories(optimizer, scheduler, scheduler_interval)
        if architecture is not None and not (
            isinstance(architecture, dict) and isinstance(architecture.get("name"), str) and is_plain(architecture)
        ):
            raise ValueError(f"architecture={architecture!r} must be None or a dict of build_model arguments with a "
                             "'name', made of strings, numbers, None, lists and dicts with string keys")
        if architecture is not None and architecture.get("num_classes", num_classes) != num_classes:
            raise ValueError(f"architecture={architecture!r} has num_classes={architecture['num_classes']!r}, the "
                             f"module num_classes={num_classes}")
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.model = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
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
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}}

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (data parallel only): shard every module of ``net`` holding parameters,
        innermost first, then ``net``, with FSDP2's ``fully_shard`` (once); nothing under another strategy."""
        if self.device_mesh is None or isinstance(self.model, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for module in reversed(list(self.model.modules())):
            if module is not self.model and any(True for _ in module.parameters(recurse=False)):
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Say so when the checkpoint was trained with quantized inputs that this model will not quantize (loaded
        without ``ActivationQuantization`` / ``ALQCallback(act_bits=...)``: its inputs stay float)."""
        modules = dict(self.named_modules())
        missing = [name for name in checkpoint.get(CHECKPOINT_KEY) or {}
                   if name not in modules or not has_input_quantizer(modules[name])]
        if missing:
            rank_zero_warn(f"the checkpoint's model was trained with quantized inputs on {missing}; loaded without "
                           f"ActivationQuantization or ALQCallback(act_bits=...), this model computes with float "
                           f"inputs (alq-export keeps them: load_packed / load_packed_for_inference)")
