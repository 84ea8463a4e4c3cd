"""Real data: LeNet5 on a Fashion-MNIST slice keeps its accuracy at under one bit per weight."""
from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from alq_lightning import ALQCallback, bit_summary
from alq_lightning.data import FashionMNISTDataModule
from alq_lightning.models import LeNet5, paper_structures
from alq_lightning.module import ClassifierModule

from tiny import trainer


@pytest.mark.slow
def test_lenet5_below_one_bit_stays_within_three_points_of_float():
    L.seed_everything(0)
    data = FashionMNISTDataModule(batch_size=128, val_size=0, train_limit=8192, test_limit=4000, download=False)
    module = ClassifierModule(LeNet5(), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    trainer([], 3).fit(module, data)
    (float_metrics,) = trainer([], 1).test(module, data)

    structures = {f"model.{name}": s for name, s in paper_structures("lenet5", module.model).items()}
    alq = ALQCallback(0.7, max_bits=6, rounds=2, basis_epochs=1, coordinate_epochs=1, ste_epochs=1,
                      final_coordinate_epochs=1, structures=structures)
    module = ClassifierModule(module.model, num_classes=10, optimizer=partial(torch.optim.Adam, lr=1e-3))
    trainer([alq], alq.total_epochs).fit(module, data)
    (metrics,) = trainer([], 1).test(module, data)

    assert bit_summary(module).avg_bits <= 0.7
    assert float_metrics["test/acc"] > 0.8
    assert metrics["test/acc"] >= float_metrics["test/acc"] - 0.03, (float_metrics, metrics)
