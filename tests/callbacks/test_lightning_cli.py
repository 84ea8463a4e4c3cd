"""ALQCallback from a LightningCLI YAML (``trainer.callbacks: [{class_path: alq_lightning.ALQCallback}]``)."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("jsonargparse")
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from alq_lightning import ALQCallback  # noqa: E402

CONFIG = """
trainer:
  max_epochs: 4
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: alq_lightning.ALQCallback
      init_args:
        target_bits: 0.8
        max_bits: 3
        structures: {"net.1": "subchannelwise(2)"}
        exclude: ["net.5"]
model:
  class_path: test_lightning_cli.Classifier
  init_args:
    width: 32
data:
  class_path: test_lightning_cli.Blobs
"""


class Classifier(L.LightningModule):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Blobs(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 1, 8, 8, generator=gen), torch.randint(4, (64,), generator=gen)
        return DataLoader(TensorDataset(x, y), batch_size=16)


def test_a_lightning_cli_yaml_configures_and_runs_the_callback(tmp_path):
    """Every argument of the YAML reaches the callback; the schedule fits ``max_epochs=4``; the fit ends at the
    target with the layer left out in float."""
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    torch.manual_seed(0)
    cli = LightningCLI(args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False,
                       subclass_mode_model=True, subclass_mode_data=True, save_config_callback=None)
    (alq,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, ALQCallback)]
    assert (alq.target_bits, alq.init.selection.max_bits) == (0.8, 3)
    assert alq.init.selection.structures == {"net.1": "subchannelwise(2)"} and alq.init.selection.exclude == ("net.5",)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert alq.schedule == {"rounds": 1, "basis_epochs": 2, "coordinate_epochs": 1, "pruning_epochs": 1,
                            "ste_epochs": 0, "final_coordinate_epochs": 0}
    assert cli.trainer.current_epoch == 4 and alq.network.avg_bits <= 0.8
    assert sorted(alq.network.layers) == ["net.1", "net.3"] and "net.5" in alq.network.float_layers
    assert alq.network.layers["net.1"].layout.describe() == "subchannelwise(2)"
