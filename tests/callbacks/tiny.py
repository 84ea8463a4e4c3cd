"""Tiny LightningModules, data and trainers for the callback tests, and a recorder of the core calls
``MultiBitNetwork`` makes per optimizer step."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import alq_lightning.network as network_module


class TinyModule(L.LightningModule):
    """Classifier around ``net`` trained by Adam (its float parameters keep training under ALQ)."""

    def __init__(self, net: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def small_cnn() -> nn.Module:
    """Conv + BatchNorm + grouped conv + depthwise conv + Linear."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 4),
    )


class WithFloatParts(nn.Module):
    """Has an Embedding, a LayerNorm and a Conv1d the callback must treat correctly."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 8)
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).transpose(1, 2)
        h = self.conv(h).relu().mean(dim=2)
        return self.head(self.norm(h))


class TinyTransformer(nn.Module):
    """Token embedding, a raw position embedding, one pre-norm encoder layer (attention's Q/K/V in the raw
    ``in_proj_weight``), a Linear head on the mean token: every weight matrix is a different kind."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 16)
        self.position = nn.Parameter(torch.randn(1, 8, 16) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.position).mean(dim=1))


def make_data(kind: str, n: int = 256, seed: int = 0) -> TensorDataset:
    """A learnable 4-class problem: images ``[n, 1, 8, 8]`` or token sequences ``[n, 8]``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "tokens":
        x = torch.randint(0, 8, (n, 8), generator=g)
        y = (x[:, 0] % 4)
    else:
        x = torch.randn(n, 1, 8, 8, generator=g)
        y = (x[:, 0, :4].mean((1, 2)) > 0).long() * 2 + (x[:, 0, :, :4].mean((1, 2)) > 0).long()
    return TensorDataset(x, y)


def loader(kind: str = "image", n: int = 256, batch_size: int = 32) -> DataLoader:
    return DataLoader(make_data(kind, n), batch_size=batch_size, shuffle=False)


def trainer(callbacks, max_epochs: int, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, max_epochs=max_epochs, **options)


def build(kind: str, seed: int = 0) -> TinyModule:
    torch.manual_seed(seed)
    return TinyModule({"mlp": mlp, "cnn": small_cnn, "float_parts": WithFloatParts,
                       "transformer": TinyTransformer}[kind]())


CORE = ("weight_domain_step", "coordinate_step", "observe", "quadratic_model")


@dataclass
class Call:
    """One core call: function name and its ``step`` / ``lr`` arguments (None where it has none)."""

    name: str
    step: int | None
    lr: float | None


@dataclass
class Step:
    """One optimizer step: its epoch, the core calls made during it, and the bits and weights after it."""

    epoch: int
    calls: list[Call]
    avg_bits: float
    binary_bits: int
    weights_changed: bool
    floats_changed: bool


class Recorder(Callback):
    """Collects :class:`Step` records; install the core wrappers with :func:`record_core_calls`.

    A step closes in ``on_train_batch_end`` when ``global_step`` has moved, so with gradient accumulation
    micro-batches that did not step add nothing; core calls made between optimizer steps land in ``stray``.
    """

    def __init__(self, alq) -> None:
        self.alq = alq
        self.steps: list[Step] = []
        self.pending: list[Call] = []
        self.stray: list[Call] = []

    def _snapshot(self, pl_module) -> None:
        quantized = {id(layer.param) for layer in self.alq.network.layers.values()}
        self.weights = {n: layer.param.detach().clone() for n, layer in self.alq.network.layers.items()}
        self.floats = {n: p.detach().clone() for n, p in pl_module.named_parameters() if id(p) not in quantized}

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial_bits = self.alq.network.avg_bits
        self.initial_binary = self.alq.network.binary_bits
        self.last_global_step = trainer.global_step
        self._snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.last_global_step:
            self.stray += self.pending
            self.pending = []
            return
        self.last_global_step = trainer.global_step
        network = self.alq.network
        weights, floats = self.weights, self.floats
        self._snapshot(pl_module)
        self.steps.append(Step(
            epoch=trainer.current_epoch, calls=self.pending, avg_bits=network.avg_bits,
            binary_bits=network.binary_bits,
            weights_changed=any(not torch.equal(weights[n], w) for n, w in self.weights.items()),
            floats_changed=any(not torch.equal(floats[n], p) for n, p in self.floats.items()),
        ))
        self.pending = []


def record_core_calls(monkeypatch, recorder: Recorder) -> None:
    """Wrap the core functions as ``alq_lightning.network`` imported them: call the original, then record.

    A bucket step is recorded as ``basis_step`` / ``ste_step`` / ``coordinate_step`` / ``observe`` with its ``lr``
    (None for ``observe``) and the step counter it left on every group of the bucket (the sorted values when
    groups differ, so a layer left out shows); pruning's ``quadratic_model`` with its ``step`` and ``lr`` arguments.
    """
    for name in CORE:
        original = getattr(network_module, name)
        signature = inspect.signature(original)

        @functools.wraps(original)
        def wrapper(*args, _name=name, _original=original, _signature=signature, **kwargs):
            bound = _signature.bind(*args, **kwargs).arguments
            result = _original(*args, **kwargs)
            if _name == "quadratic_model":
                recorder.pending.append(Call(_name, bound["step"], bound["lr"]))
                return result
            bucket = bound["bucket"]
            counters = bucket.weight_steps if _name == "weight_domain_step" else bucket.coord_steps
            steps = sorted(set(counters.tolist()))
            label = ("ste_step" if bound.get("ste") else "basis_step") if _name == "weight_domain_step" else _name
            step = steps[0] if len(steps) == 1 else tuple(steps)
            recorder.pending.append(Call(label, step, bound.get("lr")))
            return result

        monkeypatch.setattr(network_module, name, wrapper)
