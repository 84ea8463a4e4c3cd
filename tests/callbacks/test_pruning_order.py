"""Which slots the pruning stage removes, through a Trainer: at every pruning step, the least important live slots by
the quadratic model (ALGORITHM.md §4), computed here from the callback's own statistics, and no more of them than
the step's bit request needs."""
from __future__ import annotations

import pytest
import torch

from alq_lightning import ALQCallback
from alq_lightning.network import MultiBitNetwork

from tiny import build, loader, trainer

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # QuadraticConfig's defaults


def importance(layer, t: int, lr: float) -> torch.Tensor:
    """``[G, K]`` float64: ``Δℓ = −p_α α + ½ h_α α²`` with ``p = η m / (1 − β1^t)``, ``h = (√v̄ + ε) / √(1 − β2^t)``
    (ALGORITHM.md §3-4); dead slots ``+inf``."""
    stats, alpha = layer.coord_stats, layer.state.coords.double()
    p = stats.m.double() * lr / (1 - BETA1**t)
    h = (stats.vmax.double().sqrt() + EPS) / (1 - BETA2**t) ** 0.5
    return torch.where(layer.state.mask, -p * alpha + 0.5 * h * alpha.square(), torch.inf)


class Spy:
    """Wraps ``MultiBitNetwork.prune_slots``: per call, the request, every layer's Δℓ and group size before, and the
    slots it removed."""

    def __init__(self, monkeypatch) -> None:
        self.calls = []
        original = MultiBitNetwork.prune_slots

        def prune_slots(network, bits_to_remove, lr, per_bit=False):
            steps = network.coord_steps
            scores = {name: importance(layer, steps[name], lr) for name, layer in network.layers.items()}
            before = {name: layer.state.mask.clone() for name, layer in network.layers.items()}
            removed = original(network, bits_to_remove, lr, per_bit)
            gone = {name: before[name] & ~layer.state.mask for name, layer in network.layers.items()}
            sizes = {name: layer.layout.group_size for name, layer in network.layers.items()}
            self.calls.append((bits_to_remove, per_bit, scores, sizes, gone, removed))
            return removed

        monkeypatch.setattr(MultiBitNetwork, "prune_slots", prune_slots)


@pytest.mark.parametrize("per_bit", [False, True])
def test_each_pruning_step_removes_the_least_important_slots_by_the_quadratic_model(monkeypatch, per_bit):
    """MLP 64-32-4 at 3 bits pruned to 1.2 over one epoch of 8 steps. At each step: every removed slot ranks at or
    below every slot kept (by ``Δℓ``, or ``Δℓ / n`` with ``per_bit``), the removed bits reach the request, and
    without the most important removed slot they would not."""
    spy = Spy(monkeypatch)
    alq = ALQCallback(1.2, max_bits=3, rounds=1, basis_epochs=1, pruning_epochs=1, coordinate_epochs=0,
                      ste_epochs=0, final_coordinate_epochs=0, per_bit=per_bit)
    trainer([alq], alq.total_epochs, limit_val_batches=0).fit(build("mlp"), loader())
    assert len(spy.calls) == 8
    for step, (request, seen_per_bit, scores, sizes, gone, removed) in enumerate(spy.calls):
        assert seen_per_bit == per_bit
        rank = {name: score / sizes[name] if per_bit else score for name, score in scores.items()}
        taken = torch.cat([rank[name][gone[name]] for name in rank])
        kept = torch.cat([rank[name][~gone[name] & torch.isfinite(rank[name])] for name in rank])
        assert taken.numel() > 0 and bool(torch.isfinite(taken).all()), step
        # Δℓ in float64 here against the library's float32: ranks agree up to that rounding
        assert taken.max() <= kept.min() + 1e-5 * max(taken.max().abs(), kept.min().abs()), step
        bits = sum(int(gone[name].sum()) * sizes[name] for name in gone)
        assert bits == removed >= request, step
        last = max((name for name in gone if gone[name].any()), key=lambda name: rank[name][gone[name]].max())
        assert bits - sizes[last] < request, f"step {step}: {bits} bits removed for {request}"
    assert alq.network.avg_bits <= 1.2
