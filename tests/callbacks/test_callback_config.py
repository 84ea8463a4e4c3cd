"""Misconfiguration, layer selection, faults and the user's optimizer."""
from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

from alq_lightning import ALQCallback, ALQInit, BasisRefit, BitwidthReduction, CoordinateRefit

from tiny import TinyModule, build, loader, trainer


def short(**kwargs) -> ALQCallback:
    options = dict(target_bits=0.8, max_bits=3, rounds=1, basis_epochs=1, coordinate_epochs=1, ste_epochs=0,
                   final_coordinate_epochs=0)
    options.update(kwargs)
    return ALQCallback(**options)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(target_bits=0), r"target_bits=0 .*\(0, max_bits=3\)"),
        (dict(target_bits=-1.0), r"target_bits=-1.0"),
        (dict(target_bits=3), r"target_bits=3 .*\(0, max_bits=3\)"),
        (dict(target_bits="1"), r"target_bits='1'"),
        (dict(max_bits=0), r"max_bits=0 must be an integer in \[1, 8\]"),
        (dict(max_bits=9), r"max_bits=9 must be an integer in \[1, 8\]"),
        (dict(basis_epochs=-1), r"basis_epochs=-1 .*integer >= 0"),
        (dict(ste_epochs=1.5), r"ste_epochs=1.5 .*integer >= 0"),
        (dict(pruning_epochs=0), r"pruning_epochs=0 .*integer >= 1"),
        (dict(rounds=0), r"rounds=0 .*integer >= 1"),
        (dict(lr=0.0), r"lr=0.0 .*number > 0"),
        (dict(lr_decay=1.5), r"lr_decay=1.5 .*\(0, 1\]"),
        (dict(pruning="rows"), r"pruning='rows' .*coordinates"),
        (dict(pruning="groups", per_bit=True), r"per_bit=True"),
        (dict(max_bits_overrides={"net.0": 11}), r"max_bits_overrides\['net.0'\].*max_bits=11"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        short(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(structures={"net.0": "rowwise"}), r"structure='rowwise' is unknown; allowed: kernelwise"),
        (dict(structures={"net.10": "subchannelwise(5)"}),
         r"subchannels=5 must be a positive divisor of the input size 64"),
        (dict(structures={"net.0": "subchannelwise(2)"}), r"layer 'net.0'.*divisor of the input size 3"),
        (dict(structures={"net.0": "columnwise"}), r"layer 'net.0'.*columnwise' needs a transposed Linear"),
        (dict(include=["encoder.*"]), r"include pattern 'encoder.\*' matches no weight parameter"),
        (dict(types=["Embedding"]), r"types=\['Embedding'\] has \['Embedding'\], which hold no weight parameter"),
        (dict(exclude=["nothing"]), r"exclude pattern 'nothing' matches no"),
        (dict(structures={"head": "pixelwise"}), r"structures pattern 'head' matches no"),
        (dict(types=["Linear"], include=["net.0"]), r"no layer to quantize"),
    ],
)
def test_bad_layer_selection_is_refused_at_setup(kwargs, message):
    alq = short(**kwargs)
    with pytest.raises(ValueError, match=message):
        trainer([alq], alq.total_epochs).fit(build("cnn"), loader())


class OnlyVectors(nn.Module):
    """Parameters, but none with two dimensions."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.flatten(1))[:, :4] * self.scale


def test_a_module_without_weight_matrices_is_refused():
    module = TinyModule(OnlyVectors())
    alq = short()
    with pytest.raises(ValueError, match=r"no weight to quantize in TinyModule: it has no floating-point parameter"):
        trainer([alq], alq.total_epochs).fit(module, loader())


def test_max_epochs_too_small_says_what_to_set():
    alq = short()
    expected = rf"max_epochs=2\) cannot hold .* set Trainer\(max_epochs={alq.total_epochs}\)"
    with pytest.raises(ValueError, match=expected):
        trainer([alq], 2).fit(build("cnn"), loader())


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy])
def test_other_sharding_strategies_are_refused_naming_fsdp2(strategy):
    class FakeTrainer:
        pass

    fake = FakeTrainer()
    fake.strategy = strategy.__new__(strategy)
    with pytest.raises(ValueError, match=r"not supported.*ModelParallelStrategy.*fully_shard.*strategy='ddp'"):
        ALQInit().setup(fake, build("cnn"), "fit")


def test_stage_without_init_is_refused():
    with pytest.raises(ValueError, match="BasisRefit needs exactly one ALQInit"):
        trainer([BasisRefit(0, 1)], 1).fit(build("cnn"), loader())


def test_selection_overrides_and_float_layers_are_listed(caplog):
    alq = short(structures={"net.0": "channelwise", "net.3": "kernelwise"}, max_bits_overrides={"net.3": 2},
                keep_last=True, exclude=["net.6"])
    with caplog.at_level("INFO"):
        trainer([alq], alq.total_epochs).fit(build("cnn"), loader())
    layers = alq.network.layers
    assert list(layers) == ["net.0", "net.3"]
    assert layers["net.0"].layout.describe() == "channelwise" and layers["net.0"].layout.group_size == 9
    assert layers["net.3"].layout.describe() == "kernelwise" and layers["net.3"].state.max_bits == 2
    assert alq.network.float_layers == {"net.6": "matched by exclude", "net.10": "last layer kept in float"}
    assert "left in float: net.6 (matched by exclude), net.10 (last layer kept in float)" in caplog.text


def test_float_parameters_keep_training_and_param_groups_are_untouched():
    module = build("cnn")
    alq = short(keep_last=True)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    groups, optimizer_states = [], []

    class Watch(Callback):
        def on_train_start(self, trainer, pl_module):
            groups.append([list(g["params"]) for g in trainer.optimizers[0].param_groups])

        def on_train_end(self, trainer, pl_module):
            groups.append([list(g["params"]) for g in trainer.optimizers[0].param_groups])
            optimizer_states.append(trainer.optimizers[0].state)

    trainer([alq, Watch()], alq.total_epochs).fit(module, loader())
    assert len(groups[0]) == len(groups[1]) and all(
        len(a) == len(b) and all(x is y for x, y in zip(a, b)) for a, b in zip(groups[0], groups[1]))
    for name in ("net.0.bias", "net.1.weight", "net.10.weight", "net.10.bias"):
        assert not torch.equal(before[name], module.get_submodule(name.rsplit(".", 1)[0]).get_parameter(
            name.rsplit(".", 1)[1]).detach()), f"{name} should keep training"
    for layer in alq.network.layers.values():
        assert not optimizer_states[0].get(layer.param), "quantized weights must not reach the optimizer"


class NaNAt(Callback):
    """Makes the quantized weights' gradients non-finite at one global step."""

    def __init__(self, alq: ALQCallback, step: int) -> None:
        self.alq, self.step, self.before, self.after = alq, step, None, None

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            next(iter(self.alq.network.layers.values())).param.grad[0].fill_(float("nan"))
            self.before = self.alq.network.state_tensors()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            self.after = self.alq.network.state_tensors()


@pytest.mark.parametrize("step", [3, 11, 19])
def test_non_finite_gradient_skips_the_update_and_leaves_state_untouched(step):
    """Basis (3) and coordinate (11) steps leave everything as it was; a pruning step (19) folds nothing into
    the statistics but still prunes on schedule, so the round's budget holds."""
    alq = short()
    probe = NaNAt(alq, step)
    with pytest.warns(UserWarning, match=rf"skipped 1 ALQ update\(s\) in epoch {step // 8}: .*not finite"):
        trainer([alq, probe], alq.total_epochs).fit(build("cnn"), loader())
    pruning = isinstance(alq.stage_at(step // 8), BitwidthReduction)
    assert pruning == (step == 19)
    for name, tensors in probe.before.items():
        for key, tensor in tensors.items():
            if pruning and key in ("codes", "coords", "mask"):
                continue
            assert torch.equal(tensor, probe.after[name][key]), f"{name}.{key}"
        if pruning:
            before, after = probe.before[name]["mask"], probe.after[name]["mask"]
            assert not bool((after & ~before).any()), name
    if pruning:
        pruned = sum(int((probe.before[n]["mask"] & ~probe.after[n]["mask"]).sum()) for n in probe.before)
        assert pruned > 0, "the pruning step must still prune toward its budget"
    assert alq.network.avg_bits <= 0.8


def test_weights_outside_every_stage_window_stay_frozen():
    init = ALQInit(max_bits=2)
    stage = CoordinateRefit(start_epoch=1, epochs=1)
    module = build("mlp")
    snapshots = []

    class Snap(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots.append(pl_module.net[1].weight.detach().clone())

    trainer([init, stage, Snap()], 3).fit(module, loader())
    assert not torch.equal(snapshots[0], snapshots[1]), "the coordinate stage must move the weights"
    assert torch.equal(snapshots[1], snapshots[2]), "outside every window the quantized weights are frozen"
