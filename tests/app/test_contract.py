"""Your own module by YAML: a module that does not log what the app reports is refused before any training step,
naming the missing metric and how to set ``optimized_metric``; one that logs another validation metric runs when
``optimized_metric`` names it."""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from alq_lightning.app import ConfigError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from train import train  # noqa: E402

STEPS = {"train": 0}


class Blobs(L.LightningDataModule):
    def loader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        y = torch.arange(96) % 3
        x = 3 * torch.eye(3, 12)[y] + torch.randn(96, 12, generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=32)

    train_dataloader = val_dataloader = test_dataloader = loader


class Scores(L.LightningModule):
    """Logs ``val/score`` and ``test/acc``, not ``val/acc``; counts its training steps."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))

    def accuracy(self, batch) -> torch.Tensor:
        x, y = batch
        return (self.body(x).argmax(1) == y).float().mean()

    def training_step(self, batch, batch_idx):
        STEPS["train"] += 1
        x, y = batch
        return nn.functional.cross_entropy(self.body(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val/score", self.accuracy(batch))

    def test_step(self, batch, batch_idx):
        self.log("test/acc", self.accuracy(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class Untested(Scores):
    test_step = L.LightningModule.test_step


def config(tmp_path: Path, module: type, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "logger=none", f"paths.output_dir={tmp_path / 'run'}",
                                           f"pretrain.cache_dir={tmp_path / 'cache'}", "extras.print_config=false",
                                           "trainer.enable_progress_bar=false", "alq.structures=null",
                                           "alq.max_bits=4", "alq.target_bits=1", *overrides])
    cfg.model = OmegaConf.create({"_target_": f"{__name__}.{module.__name__}"})
    cfg.data = OmegaConf.create({"_target_": f"{__name__}.Blobs"})
    return cfg


@pytest.fixture(autouse=True)
def _counted():
    torch.set_num_threads(1)
    STEPS["train"] = 0


def test_a_missing_validation_metric_is_refused_before_any_training_step(tmp_path):
    with pytest.raises(ConfigError) as error:
        train(config(tmp_path, Scores))
    assert str(error.value) == (
        "model: Scores logs no 'val/acc' in its validation_step (one validation batch logged: val/score); log it "
        "there with self.log('val/acc', value), or select on another metric it logs: optimized_metric=val/score")
    assert STEPS["train"] == 0


def test_a_module_without_test_step_is_refused_before_any_training_step(tmp_path):
    with pytest.raises(ConfigError, match=r"model: Untested defines no test_step; the app reports the test accuracy "
                                          r"before and after ALQ: log it there with self.log\('test/acc', accuracy\)"):
        train(config(tmp_path, Untested, "optimized_metric=val/score"))
    assert STEPS["train"] == 0


def test_the_module_runs_when_optimized_metric_names_what_it_logs(tmp_path):
    results = train(config(tmp_path, Scores, "optimized_metric=val/score"))
    assert STEPS["train"] > 0 and results["optimized_metric"]["name"] == "val/score"
    assert 0 < results["avg_bits"] <= 1 and results["val_acc"] is None
