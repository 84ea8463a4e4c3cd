"""Two CPU processes under DDP, each on its own data shard, end with identical multi-bit state."""
from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

from alq_lightning import ALQCallback
from alq_lightning.data import SyntheticDataModule

from tiny import build, loader, trainer


class SaveState(Callback):
    def __init__(self, alq: ALQCallback, directory) -> None:
        self.alq, self.directory = alq, directory

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.alq.network.state_tensors(), self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_ranks_end_with_identical_masks_and_coords(tmp_path, strategy):
    alq = ALQCallback(0.8, max_bits=3, rounds=2, basis_epochs=1, coordinate_epochs=1, ste_epochs=1,
                      final_coordinate_epochs=1)
    data = SyntheticDataModule(num_classes=4, in_channels=1, input_size=8, train_size=256, val_size=0,
                               test_size=64, batch_size=32)
    trainer([alq, SaveState(alq, tmp_path)], alq.total_epochs, strategy=strategy, devices=2).fit(build("cnn"), data)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert set(rank0) == set(rank1)
    for name in rank0:
        for key in ("codes", "coords", "mask", "weight_m", "weight_vmax", "coord_m", "latent"):
            assert torch.equal(rank0[name][key], rank1[name][key]), f"{name}.{key}"
    assert any(not bool(rank0[name]["mask"].all()) for name in rank0), "pruning must have happened"


@pytest.mark.slow
def test_transformer_ranks_end_with_identical_state(tmp_path):
    """Attention's raw ``in_proj_weight``, the embedding and the position embedding stay equal across ranks."""
    alq = ALQCallback(0.8, max_bits=3, rounds=1, basis_epochs=1, coordinate_epochs=1, ste_epochs=1,
                      final_coordinate_epochs=0)
    trainer([alq, SaveState(alq, tmp_path)], alq.total_epochs, strategy="ddp_fork", devices=2).fit(
        build("transformer"), loader("tokens"))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert {"net.embed", "net.position", "net.encoder.self_attn.in_proj_weight", "net.head"} <= set(rank0) == set(rank1)
    for name in rank0:
        for key in ("codes", "coords", "mask", "weight_m", "weight_vmax", "coord_m", "latent"):
            assert torch.equal(rank0[name][key], rank1[name][key]), f"{name}.{key}"
    assert any(not bool(rank0[name]["mask"].all()) for name in rank0), "pruning must have happened"
