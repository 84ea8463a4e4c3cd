"""ALQCallback on tiny modules: invariants after every stage, the bit target, pruning granularity."""
from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback

from alq_lightning import ALQCallback, BitwidthReduction, GroupPruning
from alq_lightning.core import round_budget

from tiny import build, loader, trainer


def short(target_bits: float = 0.8, **kwargs) -> ALQCallback:
    options = dict(max_bits=3, rounds=2, basis_epochs=1, coordinate_epochs=1, ste_epochs=1, final_coordinate_epochs=1)
    options.update(kwargs)
    return ALQCallback(target_bits, **options)


class Probe(Callback):
    """Checks the invariants after every epoch and records the average bits."""

    def __init__(self, alq: ALQCallback) -> None:
        self.alq = alq
        self.bits: dict[int, float] = {}
        self.masks: dict[str, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        network = self.alq.network
        for name, layer in network.layers.items():
            state = layer.state
            assert torch.equal(layer.param.detach(), layer.layout.from_groups(state.reconstruct())), name
            assert bool((state.coords >= 0).all()), name
            assert bool((state.coords[~state.mask] == 0).all()), name
            if name in self.masks:
                assert not bool((state.mask & ~self.masks[name]).any()), f"{name}: a pruned slot came back"
            self.masks[name] = state.mask.clone()
        if self.alq.activations is not None:  # quantized inputs from the first epoch (act_start="start")
            for name, layer in self.alq.activations.layers.items():
                assert layer.enabled and layer.ready and bool(torch.isfinite(layer.coords).all()), name
        self.bits[trainer.current_epoch] = network.avg_bits


@pytest.mark.parametrize("act_bits", [None, 2], ids=["float inputs", "2-bit inputs"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "float_parts", "transformer"])
def test_invariants_hold_after_every_stage_and_rounds_follow_the_budget(kind, act_bits):
    alq = short(0.8, act_bits=act_bits)
    probe = Probe(alq)
    data = loader("tokens" if kind in ("float_parts", "transformer") else "image")
    module = build(kind)
    trainer(callbacks=[alq, probe], max_epochs=alq.total_epochs).fit(module, data)
    matrices = {id(p) for p in module.parameters() if p.dim() >= 2}
    assert {id(layer.param) for layer in alq.network.layers.values()} == matrices, "every weight matrix, by default"
    network = alq.network
    largest_slot = max(layer.layout.group_size for layer in network.layers.values()) / network.numel
    prunings = [s for s in alq.stages if isinstance(s, BitwidthReduction)]
    for stage in prunings:
        budget = round_budget(network.initial_bits, 0.8, stage.round_index, stage.rounds)
        reached = probe.bits[stage.end_epoch - 1]
        assert budget - largest_slot < reached <= budget + 1e-12
    assert probe.bits[alq.total_epochs - 1] == network.avg_bits
    if act_bits is not None:
        assert alq.activations.layers and all(layer.act_bits == 2 for layer in alq.activations.layers.values())


@pytest.mark.parametrize("target_bits", [0.1, 0.45, 0.9, 1.7, 2.5])
@pytest.mark.parametrize("pruning", ["coordinates", "groups"])
def test_target_bits_is_reached_exactly(target_bits, pruning):
    alq = short(target_bits, pruning=pruning, ste_epochs=0, final_coordinate_epochs=0, coordinate_epochs=0)
    trainer(callbacks=[alq], max_epochs=alq.total_epochs).fit(build("cnn"), loader())
    network = alq.network
    if pruning == "coordinates":
        tolerance = max(layer.layout.group_size for layer in network.layers.values()) / network.numel
    else:
        largest_slot = max(layer.layout.group_size * layer.state.max_bits for layer in network.layers.values())
        tolerance = largest_slot / network.numel
    assert target_bits - tolerance < network.avg_bits <= target_bits


def test_group_pruning_removes_whole_groups_only():
    alq = short(1.0, pruning="groups", rounds=1, ste_epochs=0, final_coordinate_epochs=0)
    (pruning,) = [s for s in alq.stages if isinstance(s, GroupPruning)]
    before = {}

    class Snapshot(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == pruning.start_epoch:
                before.update({n: layer.state.mask.clone() for n, layer in alq.network.layers.items()})

    trainer(callbacks=[alq, Snapshot()], max_epochs=alq.total_epochs).fit(build("cnn"), loader())
    pruned = 0
    for name, layer in alq.network.layers.items():
        after = layer.state.mask
        changed = (after != before[name]).any(dim=1)
        assert not bool(after[changed].any()), f"{name}: a group lost only some of its slots"
        pruned += int(changed.sum())
    assert pruned > 0


def test_per_bit_ranking_changes_the_selection_but_keeps_the_budget():
    bits = {}
    for per_bit in (False, True):
        alq = short(0.8, per_bit=per_bit, rounds=1, ste_epochs=0, final_coordinate_epochs=0)
        trainer(callbacks=[alq], max_epochs=alq.total_epochs).fit(build("cnn"), loader())
        bits[per_bit] = {name: layer.state.mask.clone() for name, layer in alq.network.layers.items()}
        assert alq.network.avg_bits <= 0.8
    assert any(not torch.equal(bits[False][name], bits[True][name]) for name in bits[False])


def test_total_epochs_counts_every_stage():
    alq = ALQCallback(0.5, rounds=3, basis_epochs=2, coordinate_epochs=1, pruning_epochs=1, ste_epochs=4,
                      final_coordinate_epochs=2, start_epoch=1)
    assert alq.total_epochs == 1 + 3 * (2 + 1 + 1) + 4 + 2
    windows = sorted((s.start_epoch, s.end_epoch) for s in alq.stages)
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:])), "stages must tile the schedule"
    assert windows[0][0] == 1 and windows[-1][1] == alq.total_epochs


def test_learning_rate_schedule_restarts_each_round_and_decays_per_epoch():
    alq = ALQCallback(0.5, rounds=2, basis_epochs=2, coordinate_epochs=1, ste_epochs=2, final_coordinate_epochs=1,
                      lr=1e-3, lr_decay=0.5, ste_lr=2e-3, ste_lr_decay=0.9, final_lr_decay=0.8)

    class At:
        def __init__(self, epoch):
            self.current_epoch = epoch

    expected = {0: 1e-3, 1: 5e-4, 2: 2.5e-4, 3: 1.25e-4, 4: 1e-3, 7: 1.25e-4, 8: 2e-3, 9: 1.8e-3,
                10: 2e-3 * 0.81}
    for epoch, lr in expected.items():
        assert math.isclose(alq.stage_at(epoch).current_lr(At(epoch)), lr, rel_tol=1e-12), epoch


def test_fit_stops_when_the_schedule_is_complete():
    alq = short(0.8, rounds=1, ste_epochs=0, final_coordinate_epochs=0)
    fitted = trainer(callbacks=[alq], max_epochs=alq.total_epochs + 5)
    fitted.fit(build("mlp"), loader())
    assert fitted.current_epoch == alq.total_epochs
    assert alq.network.avg_bits <= 0.8
