"""``alq-export --module package.Class``: any LightningModule's checkpoint, rebuilt by its own
``load_from_checkpoint``, ends as a packed file that loads back into the same module."""
from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from alq_lightning import ALQCallback
from alq_lightning.packed.cli import export_main
from alq_lightning.packed.io import load_packed, read_packed


class Blob(L.LightningModule):
    """A user's module: its own layer names (``body.*``), its hyper-parameters saved."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 3
    return DataLoader(TensorDataset(3 * torch.eye(3, 12)[y] + torch.randn(64, 12, generator=generator), y),
                      batch_size=16)


def test_any_lightning_modules_checkpoint_exports_by_class_path(tmp_path, capsys):
    torch.manual_seed(0)
    alq = ALQCallback(target_bits=1.0, max_bits=3, rounds=1, basis_epochs=1, coordinate_epochs=1, ste_epochs=0,
                      final_coordinate_epochs=0)
    module = Blob(hidden=24)
    trainer = L.Trainer(callbacks=[alq], max_epochs=alq.total_epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data())
    trainer.save_checkpoint(tmp_path / "blob.ckpt")
    out = tmp_path / "blob.alq"
    assert export_main([str(tmp_path / "blob.ckpt"), str(out), "--module", f"{__name__}.Blob"]) == 0
    assert {entry["name"] for entry in read_packed(out).header["layers"]} == {"body.0", "body.2"}
    assert "body.2" in capsys.readouterr().out
    loaded = load_packed(out, Blob(hidden=24)).eval()
    module.eval()
    x = torch.randn(8, 12)
    # The loaded weights are rebuilt layer by layer, the trained ones bucket by bucket: Σ α_k β_k may sum in
    # another order, so they agree to a few ulps.
    for name in ("body.0.weight", "body.2.weight", "body.0.bias"):
        torch.testing.assert_close(loaded.state_dict()[name], module.state_dict()[name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loaded(x), module(x), rtol=1e-5, atol=1e-6)


def test_a_class_path_that_cannot_serve_is_refused(tmp_path, capsys):
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Blob(), data())
    trainer.save_checkpoint(tmp_path / "float.ckpt")
    path = str(tmp_path / "float.ckpt")
    cases = [("nowhere.Blob", "--module='nowhere.Blob' cannot be imported"),
             ("torch.nn.Linear", "--module='torch.nn.Linear' is not a LightningModule class"),
             (f"{__name__}.Blob", "float.ckpt holds no multi-bit tensors under 'alq': it was not written with ALQ")]
    for class_path, message in cases:
        assert export_main([path, str(tmp_path / "out.alq"), "--module", class_path]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out.alq").exists()
