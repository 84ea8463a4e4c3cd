"""In a float64 fit, each update ALQCallback applied equals the core oracles of ``tests/core/step_oracles.py``
for the gradient it consumed and the state it started from: basis, coordinate, pruning-observation and STE steps."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback

from alq_lightning import ALQCallback
from alq_lightning.core import MultiBitState

from tiny import build, loader, trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from step_oracles import (  # noqa: E402
    B1,
    B2,
    EPS,
    assert_fit_matches,
    check_state,
    coordinate_oracle,
    expect_coord_stats,
    fit_oracle,
    reconstruct,
)

LR, DECAY, STE_LR, STE_DECAY = 1e-2, 0.5, 5e-3, 0.9
# 2 optimizer steps per epoch; epochs: 0-1 basis, 2 coordinate, 3 pruning, 4 STE, 5 final coordinate.
# Per step: (stage, documented lr, documented step counter of the statistics it updates).
STEPS = [("basis", LR, 1), ("basis", LR, 2), ("basis", LR * DECAY, 3), ("basis", LR * DECAY, 4),
         ("coordinate", LR * DECAY**2, 5), ("coordinate", LR * DECAY**2, 6),
         ("pruning", LR * DECAY**3, 7), ("pruning", LR * DECAY**3, 8),
         ("ste", STE_LR, 5), ("ste", STE_LR, 6),
         ("coordinate", STE_LR * STE_DECAY, 7), ("coordinate", STE_LR * STE_DECAY, 8)]
FIRST_STE = 8


def snapshot(layer) -> dict[str, torch.Tensor]:
    tensors = {key: layer.buffer(key).clone() for key in layer.multibit_tensors()}
    tensors["weight"] = layer.param.detach().clone()
    return tensors


def state_of(tensors) -> MultiBitState:
    return MultiBitState(tensors["codes"], tensors["coords"], tensors["mask"])


class Stats:
    def __init__(self, tensors, domain: str) -> None:
        self.m, self.v, self.vmax = (tensors[f"{domain}_{key}"] for key in ("m", "v", "vmax"))


class Capture(Callback):
    """Placed before ALQCallback: the dense gradient and the multi-bit tensors ALQ is about to consume, then
    the tensors after the optimizer step."""

    def __init__(self, alq: ALQCallback) -> None:
        self.alq, self.steps = alq, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before = {name: {**snapshot(layer), "grad": layer.param.grad.detach().clone()}
                       for name, layer in self.alq.network.layers.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = {name: snapshot(layer) for name, layer in self.alq.network.layers.items()}
        self.steps.append((self.before, after))


def amsgrad_step(before, grad, lr, t):
    """One hand AMSGrad update of the weight statistics: (m, v, v̄, p, h)."""
    m = B1 * before["weight_m"] + (1 - B1) * grad
    v = B2 * before["weight_v"] + (1 - B2) * grad**2
    vmax = torch.maximum(before["weight_vmax"], v)
    return m, v, vmax, lr * m / (1 - B1**t), (vmax.sqrt() + EPS) / (1 - B2**t) ** 0.5


def close(got, want) -> None:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-13)


def test_every_step_of_a_fit_equals_the_core_oracles():
    """For every optimizer step and layer, from the captured gradient (group layout of a Linear row) and state:
    basis / STE steps fold it into the weight statistics, fit bases and coordinates to ``ŵ - p/h`` (to the
    latent ``w_lat - p/h``, which starts at ŵ) by brute force, and re-derive the coordinate statistics;
    coordinate steps equal the hand AMSGrad-with-flips oracle; pruning steps update the coordinate statistics
    without stepping the coordinates, only clearing slots; ŵ is written into the weight after each step."""
    alq = ALQCallback(0.8, max_bits=3, rounds=1, basis_epochs=2, coordinate_epochs=1, ste_epochs=1,
                      final_coordinate_epochs=1, lr=LR, lr_decay=DECAY, ste_lr=STE_LR, ste_lr_decay=STE_DECAY)
    capture = Capture(alq)
    model = build("mlp").double()  # the multi-bit state takes the weight's dtype at setup
    trainer([capture, alq], alq.total_epochs, precision="64-true").fit(model, loader(n=32, batch_size=16))
    assert len(capture.steps) == len(STEPS)
    for index, ((stage, lr, t), (before, after)) in enumerate(zip(STEPS, capture.steps)):
        for name, layer in alq.network.layers.items():
            old, new = before[name], after[name]
            assert new["coords"].dtype == torch.float64 and layer.layout.describe() == "subchannelwise(1)"
            grad = old["grad"].reshape(old["codes"].shape)
            assert bool(grad.abs().sum() > 0)
            new_state = state_of(new)
            check_state(new_state)
            assert torch.equal(new["weight"], new_state.reconstruct().reshape(new["weight"].shape)), (stage, name)
            if stage in ("basis", "ste"):
                m, v, vmax, p, h = amsgrad_step(old, grad, lr, t)
                for key, want in (("m", m), ("v", v), ("vmax", vmax)):
                    close(new[f"weight_{key}"], want)
                if stage == "basis":
                    target = reconstruct(state_of(old).bases, old["coords"], old["mask"]) - (p / h).numpy()
                else:
                    start = state_of(old).reconstruct() if index == FIRST_STE else old["latent"]
                    target = start - p / h
                    close(new["latent"], target)
                    target = target.numpy()
                bases, coords, unique = fit_oracle(old["coords"].numpy(), old["mask"].numpy(), target, h.numpy())
                assert unique
                assert_fit_matches(new_state, bases, coords, old["mask"], torch.from_numpy(target), h)
                expect_coord_stats(new_state, Stats(new, "weight"), Stats(new, "coord"))
            else:
                coords, bases, m, v, vmax = coordinate_oracle(
                    state_of(old), Stats(old, "coord"), [grad], 0.0 if stage == "pruning" else lr, t)
                for key, want in (("m", m), ("v", v), ("vmax", vmax)):
                    close(new[f"coord_{key}"], want)
                live = new["mask"].numpy()
                if stage == "pruning":
                    assert not bool((new["mask"] & ~old["mask"]).any())
                    close(new["coords"].numpy()[live], old["coords"].numpy()[live])
                else:
                    assert torch.equal(new["mask"], old["mask"])
                    close(new["coords"], coords)
                    np.testing.assert_array_equal(new_state.bases.numpy()[live], bases[live])
