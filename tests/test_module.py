"""ClassifierModule: argument checks, optimizers, logging and a tiny overfit through a Trainer."""
from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from alq_lightning.models import LeNet5
from alq_lightning.module import ClassifierModule


def make_trainer(**kwargs: object) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def random_batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"optimizer": "sgd"}, "optimizer='sgd' must be a callable params -> torch.optim.Optimizer"),
        ({"optimizer": partial(torch.optim.SGD, lr=-1)}, r"optimizer=functools.partial\(.*SGD.*lr=-1\) cannot build"),
        ({"optimizer": partial(torch.optim.SGD, lr=0.1, colour="blue")}, "cannot build an optimizer: .*colour"),
        ({"optimizer": lambda params: "fast"}, "returned str; it must return a torch.optim.Optimizer"),
        ({"scheduler": "step"}, "scheduler='step' must be None or a callable"),
        ({"scheduler": partial(torch.optim.lr_scheduler.StepLR)}, r"scheduler=.*StepLR.* cannot build a scheduler"),
        ({"scheduler_interval": "batch"}, "scheduler_interval='batch' is not allowed; allowed: epoch, step"),
        ({"num_classes": 1}, "num_classes=1"),
        ({"net": "lenet5"}, "net=str"),
        ({"architecture": {"width": 2}}, "architecture=.* must be None or a dict of build_model arguments"),
    ],
)
def test_invalid_arguments(kwargs: dict, argument: str) -> None:
    arguments = {"net": nn.Linear(4, 3), "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=argument):
        ClassifierModule(**arguments)


def test_hyperparameters_exclude_net_and_factories() -> None:
    module = ClassifierModule(nn.Linear(4, 3), num_classes=3, optimizer=partial(torch.optim.Adam, lr=1e-3),
                              architecture={"name": "lenet5", "num_classes": 3})
    assert set(module.hparams) == {"num_classes", "scheduler_interval", "architecture"}
    assert module.model is not None and module.hparams.num_classes == 3


def test_configure_optimizers() -> None:
    default = ClassifierModule(nn.Linear(4, 3), 3).configure_optimizers()
    assert isinstance(default, torch.optim.SGD) and default.defaults["lr"] == 0.01
    assert default.defaults["momentum"] == 0.5
    sgd = ClassifierModule(nn.Linear(4, 3), 3, partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-4))
    sgd = sgd.configure_optimizers()
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 1e-4
    module = ClassifierModule(nn.Linear(4, 3), 3, optimizer=partial(torch.optim.Adam, lr=1e-3),
                              scheduler=partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[2, 4], gamma=0.2))
    config = module.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.Adam)
    assert config["lr_scheduler"]["interval"] == "epoch"
    scheduler = config["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert dict(scheduler.milestones) == {2: 1, 4: 1} and scheduler.gamma == 0.2
    frozen = nn.Linear(4, 3)
    frozen.bias.requires_grad_(False)
    only = ClassifierModule(frozen, 3).configure_optimizers()
    assert [p for group in only.param_groups for p in group["params"]] == [frozen.weight]


def test_fit_smoke_logs_train_and_val_metrics() -> None:
    torch.manual_seed(0)
    x, y = random_batch(16)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    module = ClassifierModule(LeNet5(), num_classes=10)
    trainer = make_trainer(max_steps=3, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, loader, loader)
    assert trainer.global_step == 3
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert key in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics[key])


def test_overfits_one_batch() -> None:
    torch.manual_seed(0)
    x, y = random_batch(8)
    module = ClassifierModule(LeNet5(), num_classes=10, optimizer=partial(torch.optim.Adam, lr=1e-3))
    with torch.no_grad():
        before = F.cross_entropy(module(x), y).item()
    make_trainer(max_steps=30, limit_val_batches=0).fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    with torch.no_grad():
        after = F.cross_entropy(module(x), y).item()
    assert after < 0.5 * before


def test_test_metrics_equal_hand_computed_accuracy_and_loss() -> None:
    logits = torch.tensor(
        [
            [2.0, 0.0, 0.0],
            [0.0, 3.0, 0.0],
            [0.0, 0.0, 1.0],
            [1.0, 0.0, 0.0],
            [0.0, 2.0, 1.0],
            [0.0, 0.0, 5.0],
            [4.0, 1.0, 0.0],
        ]
    )
    labels = torch.tensor([0, 1, 1, 0, 2, 2, 1])
    correct = 1 + 1 + 0 + 1 + 0 + 1 + 0
    # Batches of 4 and 3: per-batch accuracies 3/4 and 1/3 average to 13/24, not the overall 4/7.
    results = make_trainer().test(
        ClassifierModule(nn.Identity(), num_classes=3), DataLoader(TensorDataset(logits, labels), batch_size=4)
    )
    assert results[0]["test/acc"] == pytest.approx(correct / len(labels))
    assert results[0]["test/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
