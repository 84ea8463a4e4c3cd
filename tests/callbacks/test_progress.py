"""What a run shows while it runs: each stage named in the log as it starts, and the stage, round and average bits
in the progress bar; under Lightning's default ``max_epochs`` a resumed fit still ends with the schedule."""
from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from alq_lightning import ALQCallback

from tiny import build, loader

EXPECTED = ["basis 1/2", "basis 1/2", "coordinate 1/2", "pruning 1/2", "basis 2/2", "basis 2/2", "coordinate 2/2",
            "pruning 2/2", "STE", "STE"]


class BarReader(Callback):
    """The progress bar's metrics at the start of every training epoch, and the bits then (read here)."""

    def __init__(self, alq: ALQCallback) -> None:
        self.alq, self.shown, self.bits = alq, [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.shown.append(trainer.progress_bar_callback.get_metrics(trainer, pl_module))
        self.bits.append(self.alq.network.avg_bits)


def test_the_bar_shows_stage_round_and_bits_and_the_log_names_each_stage(caplog):
    torch.manual_seed(0)
    alq = ALQCallback()
    reader = BarReader(alq)
    run = L.Trainer(callbacks=[alq, reader, TQDMProgressBar()], max_epochs=10, accelerator="cpu", logger=False,
                    enable_checkpointing=False, enable_model_summary=False, limit_train_batches=2,
                    limit_val_batches=0)
    with caplog.at_level(logging.INFO):
        run.fit(build("mlp"), loader(n=32, batch_size=16))
    assert [shown["alq"] for shown in reader.shown] == EXPECTED
    assert [shown["bits"] for shown in reader.shown] == [f"{bits:.3f}" for bits in reader.bits]
    assert float(reader.shown[-1]["bits"]) <= 1.0 < float(reader.shown[0]["bits"])
    assert alq.progress(run) == {"alq": "done", "bits": f"{alq.network.avg_bits:.3f}"}
    starts = [m for m in caplog.messages if m.startswith("ALQ ") and ": epochs " in m]
    assert [m.split(":")[0] for m in starts] == ["ALQ basis 1/2", "ALQ coordinate 1/2", "ALQ pruning 1/2",
                                                 "ALQ basis 2/2", "ALQ coordinate 2/2", "ALQ pruning 2/2", "ALQ STE"]
    assert starts[3] == f"ALQ basis 2/2: epochs 4-5 of 10, from {reader.bits[4]:.3f} average bits"


def test_a_resumed_fit_under_the_default_max_epochs_ends_with_the_schedule(tmp_path):
    """Lightning's default max_epochs (1000) becomes the schedule's length again in the resumed fit's Trainer."""
    schedule = dict(rounds=1, basis_epochs=2, coordinate_epochs=1, pruning_epochs=1, ste_epochs=1,
                    final_coordinate_epochs=1)

    def trainer(alq: ALQCallback, **kwargs) -> L.Trainer:
        return L.Trainer(callbacks=[alq, ModelCheckpoint(tmp_path, "{epoch}", save_top_k=-1)], accelerator="cpu",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_train_batches=2, limit_val_batches=0, **kwargs)

    first = trainer(ALQCallback(**schedule), max_steps=6)  # interrupted after 3 of its 6 epochs
    first.fit(build("mlp"), loader(n=32, batch_size=16))
    assert first.current_epoch == 3
    alq = ALQCallback(**schedule)
    resumed = trainer(alq)
    resumed.fit(build("mlp"), loader(n=32, batch_size=16), ckpt_path=tmp_path / "epoch=2.ckpt")
    assert resumed.max_epochs == alq.total_epochs == 6 and resumed.current_epoch == 6
    assert alq.network.avg_bits <= 1.0
