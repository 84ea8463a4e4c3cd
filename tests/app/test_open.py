"""The app is open: a LightningModule and a DataModule from outside the package run by YAML alone; an interrupted
run resumed with ckpt_path ends where an uninterrupted one does; W&B gets the packed model as an artifact."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from alq_lightning.packed.io import read_packed

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from train import train  # noqa: E402

USER_CODE = '''
import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class BlobData(L.LightningDataModule):
    """Three Gaussian blobs in 12 dimensions."""

    def __init__(self, size=192, batch_size=32, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        centers = 3 * torch.randn(3, 12, generator=generator)
        self.y = torch.arange(size) % 3
        self.x = centers[self.y] + torch.randn(size, 12, generator=generator)
        self.batch_size = batch_size

    def loader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    def train_dataloader(self):
        return self.loader()

    def val_dataloader(self):
        return self.loader()

    def test_dataloader(self):
        return self.loader()


class BlobClassifier(L.LightningModule):
    """Its own network, metrics and configure_optimizers; nothing of alq_lightning."""

    def __init__(self, hidden=32, lr=0.01):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        self.lr = lr

    def step(self, batch, stage):
        x, y = batch
        logits = self.body(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss)
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean())
        return loss

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self.step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Interrupted(RuntimeError):
    pass


class Interrupt(L.Callback):
    """Stops a fit the hard way when ``epoch`` starts, as a killed job would."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Interrupted(f"interrupted at epoch {self.epoch}")
'''


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "alq_user.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_user_module_and_data_by_yaml_alone(user_code, tmp_path):
    conf = tmp_path / "user_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "data").mkdir()
    (conf / "model" / "blob.yaml").write_text("_target_: alq_user.BlobClassifier\nhidden: 32\nlr: 0.01\n")
    (conf / "data" / "blobs.yaml").write_text("_target_: alq_user.BlobData\nsize: 192\nbatch_size: 32\n")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(user_code), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "ALQ_CACHE": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "0"}
    args = [f"hydra.searchpath=[file://{conf}]", "model=blob", "data=blobs", "logger=csv", f"hydra.run.dir={out}",
            "alq.structures=null", "alq.max_bits=4", "alq.target_bits=1", "pretrain.epochs=2",
            "trainer.enable_progress_bar=false"]
    done = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["model"]["_target_"] == "alq_user.BlobClassifier"
    assert 0 < results["avg_bits"] <= 1 and results["test_acc"] > 0.6
    assert set(results["layer_bits"]) == {"body.0", "body.2"}
    layers = {entry["name"] for entry in read_packed(out / "model.alq").header["layers"]}
    assert layers == {"body.0", "body.2"}
    assert results["pretrained"]["source"] == "trained" and results["optimized_metric"]["name"] == "val/acc"
    preset = subprocess.run([sys.executable, "train.py", *args[:4], f"hydra.run.dir={tmp_path / 'preset'}",
                             "alq.max_bits=null"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert preset.returncode != 0
    assert "BlobClassifier is not one of them: set alq.max_bits and alq.structures" in preset.stderr


def smoke(tmp_path: Path, name: str, overrides: list[str]) -> tuple[dict, Path]:
    out = tmp_path / name
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "alq.rounds=2", f"paths.output_dir={out}",
                                           f"pretrain.cache_dir={tmp_path / 'cache'}", "extras.print_config=false",
                                           "trainer.enable_progress_bar=false", *overrides])
    return train(cfg), out


def alq_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint but the loop's progress counters: weights, ALQ's bases/coords/masks, Adam."""
    checkpoint = torch.load(path, weights_only=True)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if torch.is_tensor(value):
            flat[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{prefix}/{index}", item)

    for key in ("state_dict", "optimizer_states", *[k for k in checkpoint if "ALQ" in k or "alq" in k]):
        walk(key, checkpoint.get(key))
    return flat


def test_interrupted_run_resumed_from_its_checkpoint_ends_in_the_same_state(user_code, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    torch.set_num_threads(1)
    whole, whole_dir = smoke(tmp_path, "whole", ["logger=none"])
    interrupt = ["+callbacks.interrupt._target_=alq_user.Interrupt", "+callbacks.interrupt.epoch=4"]
    with pytest.raises(Exception, match="interrupted at epoch 4"):
        smoke(tmp_path, "cut", ["logger=none", *interrupt])
    cut = tmp_path / "cut" / "last.ckpt"
    assert torch.load(cut, weights_only=True)["epoch"] == 3 and not (tmp_path / "cut" / "results.json").exists()
    guard = ["+callbacks.interrupt._target_=alq_user.Interrupt", "+callbacks.interrupt.epoch=2"]  # never reached
    resumed, resumed_dir = smoke(tmp_path, "resumed", ["logger=none", f"ckpt_path={cut}", *guard])
    assert resumed["resumed_from"] == str(cut) and whole["resumed_from"] is None
    assert resumed["test_acc"] == whole["test_acc"] and resumed["val_acc"] == whole["val_acc"]
    assert resumed["avg_bits"] == whole["avg_bits"] and resumed["layer_bits"] == whole["layer_bits"]
    assert (resumed_dir / "model.alq").read_bytes() == (whole_dir / "model.alq").read_bytes()
    final, expected = alq_state(resumed_dir / "last.ckpt"), alq_state(whole_dir / "last.ckpt")
    assert final.keys() == expected.keys() and any("bases" in key or "coords" in key for key in final)
    assert all(torch.equal(final[key], expected[key]) for key in final), [
        key for key in final if not torch.equal(final[key], expected[key])]


@pytest.mark.parametrize("switch", [True, False])
def test_wandb_logs_the_packed_model_as_an_artifact(switch, tmp_path, monkeypatch):
    import wandb
    from wandb.sdk import wandb_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.set_num_threads(1)
    logged = []
    original = wandb_run.Run.log_artifact

    def spy(self, artifact, *args, **kwargs):
        logged.append(artifact)
        return original(self, artifact, *args, **kwargs)

    defined = []
    original_define = wandb_run.Run.define_metric

    def spy_define(self, name, *args, **kwargs):
        defined.append((name, kwargs.get("step_metric")))
        return original_define(self, name, *args, **kwargs)

    monkeypatch.setattr(wandb_run.Run, "log_artifact", spy)
    monkeypatch.setattr(wandb_run.Run, "define_metric", spy_define)
    results, out = smoke(tmp_path, "run", ["logger=wandb", f"logger.wandb.log_packed_model={str(switch).lower()}"])
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    # charts may take the average bits as their x-axis
    assert {("alq/*", "alq/avg_bits"), ("final/*", "final/avg_bits")} <= set(defined)
    models = [artifact for artifact in logged if artifact.type == "model"]
    if not switch:
        assert models == []
        return
    (artifact,) = models
    assert isinstance(artifact, wandb.Artifact) and artifact.type == "model"
    assert artifact.name.startswith("alq-") and list(artifact.manifest.entries) == ["model.alq"]
    assert artifact.manifest.entries["model.alq"].size == (out / "model.alq").stat().st_size
    assert artifact.metadata["avg_bits"] == pytest.approx(results["avg_bits"])
    assert artifact.metadata["storage_bytes"] == results["storage_bytes"]["coords32"]
    assert artifact.metadata["file_bytes"] == results["packed_file"]["bytes"]
    assert (artifact.metadata["test_acc"], artifact.metadata["val_acc"]) == (results["test_acc"], results["val_acc"])


def test_main_returns_the_optimized_validation_metric_not_the_test_accuracy(monkeypatch):
    import alq_lightning.app.train as app

    results = {"optimized_metric": {"name": "val/acc", "value": 0.25}, "val_acc": 0.25, "test_acc": 0.75}
    monkeypatch.setattr(app, "train", lambda cfg: results)
    assert app.main.__wrapped__(None) == 0.25
