"""Latent weights exist only during STE: 4 bytes per quantized weight that the other stages do without."""
from __future__ import annotations

from lightning.pytorch import Callback

from alq_lightning import ALQCallback, STEFineTune

from tiny import build, loader, trainer


class LatentRows(Callback):
    """Records, per epoch, how many latent rows each layer holds after its last step."""

    def __init__(self, alq: ALQCallback) -> None:
        self.alq, self.rows = alq, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows[trainer.current_epoch] = {name: layer.buffer("latent").shape[0]
                                            for name, layer in self.alq.network.layers.items()}


def test_latent_weights_are_held_during_ste_only():
    alq = ALQCallback(0.8, max_bits=3, rounds=1, basis_epochs=1, coordinate_epochs=1, ste_epochs=2,
                      final_coordinate_epochs=1)
    probe = LatentRows(alq)
    trainer([alq, probe], alq.total_epochs).fit(build("mlp"), loader())
    ste = next(stage for stage in alq.stages if isinstance(stage, STEFineTune))
    groups = {name: layer.layout.num_groups for name, layer in alq.network.layers.items()}
    for epoch, rows in probe.rows.items():
        expected = groups if ste.start_epoch <= epoch < ste.end_epoch else dict.fromkeys(groups, 0)
        assert rows == expected, epoch
    assert all(layer.buffer("latent").numel() == 0 for layer in alq.network.layers.values())
