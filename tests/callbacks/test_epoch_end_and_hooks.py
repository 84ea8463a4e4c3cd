"""What the callbacks log and say, and what their hooks do to the user's module: the metrics at each epoch's end
(names and values), the log lines, the clipping values handed to ``configure_gradient_clipping``, the modules a
pruning step puts in eval mode, and the pruning stage's budget, warning and error, step by step."""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from torch import nn

from alq_lightning import ALQCallback, ALQInit, BitwidthReduction, CoordinateRefit, GroupPruning

from tiny import TinyModule, build, loader, trainer


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append(dict(metrics))


def expected_bits(network) -> dict[str, float]:
    """The epoch-end metrics, from the masks: average and per-layer bits; storage (bases, 32-bit live
    coordinates, mask bits, each rounded up to bytes) and the whole model (plus float32 biases)."""
    layers = network.layers
    live = {name: int(layer.state.mask.sum()) for name, layer in layers.items()}
    binary = {name: live[name] * layer.layout.group_size for name, layer in layers.items()}
    storage = sum(math.ceil(binary[name] / 8) + live[name] * 4
                  + math.ceil(layer.layout.num_groups * layer.state.max_bits / 8) for name, layer in layers.items())
    metrics = {"alq/avg_bits": sum(binary.values()) / sum(layer.layout.numel for layer in layers.values()),
               "alq/storage_bytes": float(storage), "alq/model_bytes": float(storage + (32 + 4) * 4)}
    metrics.update({f"alq/{name}/bits": binary[name] / layer.layout.numel for name, layer in layers.items()})
    return metrics


class EpochBits(Callback):
    """Placed after the ALQ callback: the expected metrics at each epoch's end."""

    def __init__(self, owner) -> None:
        self.owner, self.by_epoch = owner, {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.by_epoch[trainer.current_epoch] = expected_bits(self.owner.network)


def alq_rows(logger: MemoryLogger) -> dict[int, dict[str, float]]:
    return {int(row["epoch"]): {k: v for k, v in row.items() if k.startswith("alq/")}
            for row in logger.rows if "alq/avg_bits" in row}


def test_alqinit_logs_bits_and_bytes_at_each_epoch_end():
    init = ALQInit(max_bits=3)
    probe = EpochBits(init)
    memory = MemoryLogger()
    trainer([init, CoordinateRefit(0, 2), probe], 2, logger=memory).fit(build("mlp"), loader(n=32, batch_size=16))
    rows = alq_rows(memory)
    assert sorted(rows) == [0, 1]
    for epoch, metrics in rows.items():
        expected = probe.by_epoch[epoch]
        assert sorted(metrics) == sorted(["alq/avg_bits", "alq/storage_bytes", "alq/model_bytes",
                                          "alq/net.1/bits", "alq/net.3/bits"])
        assert metrics == pytest.approx(expected, rel=1e-6)


def test_alqcallback_logs_round_learning_rate_and_bits_and_stops_when_done(caplog):
    """Epoch 0 precedes the schedule (no stage: lr 0); then two rounds of basis, coordinate and pruning epochs
    at 0.01 decaying by 0.5, STE at 0.02, and a final coordinate epoch at STE's rate decayed once (0.005).
    ``alq/round`` counts the rounds whose pruning is over."""
    alq = ALQCallback(0.8, max_bits=3, rounds=2, basis_epochs=1, coordinate_epochs=1, ste_epochs=1,
                      final_coordinate_epochs=1, lr=0.01, lr_decay=0.5, ste_lr=0.02, ste_lr_decay=0.25,
                      start_epoch=1)
    assert alq.total_epochs == 9
    probe = EpochBits(alq)
    memory = MemoryLogger()
    with caplog.at_level(logging.INFO):
        trainer([alq, probe], 20, logger=memory).fit(build("mlp"), loader(n=32, batch_size=16))
    rows = alq_rows(memory)
    assert sorted(rows) == list(range(9))
    assert [rows[e]["alq/round"] for e in range(9)] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    lrs = [0.0, 0.01, 0.005, 0.0025, 0.01, 0.005, 0.0025, 0.02, 0.005]
    assert [rows[e]["alq/lr"] for e in range(9)] == pytest.approx(lrs, rel=1e-6)
    for epoch, metrics in rows.items():
        assert sorted(metrics) == sorted(["alq/round", "alq/lr", *probe.by_epoch[epoch]]), epoch
        assert {k: metrics[k] for k in probe.by_epoch[epoch]} == pytest.approx(probe.by_epoch[epoch], rel=1e-6)
    final = alq.network.avg_bits
    assert final <= 0.8
    assert f"ALQ schedule complete after 9 epochs at {final:.4f} average bits; stopping the fit" in caplog.messages


def test_resuming_without_multibit_state_says_how_to_load_the_dense_weights():
    with pytest.raises(ValueError) as error:
        ALQInit().on_load_checkpoint(None, None, {"state_dict": {}})
    assert str(error.value) == (
        "the checkpoint holds no ALQ multi-bit state (key 'alq'); it was not written with ALQInit/ALQCallback "
        "attached. Load its dense weights with LightningModule.load_from_checkpoint instead")


class ClipRecorder(TinyModule):
    """Records each ``configure_gradient_clipping`` call: its values and whether the quantized weights still had
    their gradients (a call before ALQ consumed them)."""

    def __init__(self) -> None:
        super().__init__(build("mlp").net)
        self.calls = []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        quantized = self.net[1].weight.grad is not None
        self.calls.append((quantized, gradient_clip_val, gradient_clip_algorithm))
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def test_a_stage_hands_the_trainers_clipping_values_to_configure_gradient_clipping():
    module = ClipRecorder()
    trainer([ALQInit(max_bits=2), CoordinateRefit(0, 1)], 1, gradient_clip_val=0.5,
            gradient_clip_algorithm="value").fit(module, loader(n=32, batch_size=16))
    before_alq = [(val, algorithm) for quantized, val, algorithm in module.calls if quantized]
    assert before_alq == [(0.5, "value")] * 2


class WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_a_standalone_pruning_stage_freezes_only_the_normalisation_layers():
    """During a pruning step BatchNorm runs in eval mode; Dropout and the module itself keep training; outside
    the window BatchNorm trains again. The stage, with its defaults (one epoch, the only round), finds the
    Trainer's ALQInit and ends its window at the target."""
    torch.manual_seed(0)
    module = TinyModule(WithDropout())
    seen = []
    for index in (2, 4):
        module.net.net[index].register_forward_pre_hook(
            lambda m, args: seen.append((type(m).__name__, m.training, module.training)))
    init = ALQInit(max_bits=3)
    stage = BitwidthReduction(0, 1.5)
    trainer([init, stage], 2).fit(module, loader(n=32, batch_size=16))
    assert seen[:4] == [("BatchNorm1d", False, True), ("Dropout", True, True)] * 2
    assert seen[4:] == [("BatchNorm1d", True, True), ("Dropout", True, True)] * 2
    assert stage.init is init
    assert init.network.avg_bits <= 1.5


# The pruning stage step by step --------------------------------------------------------------------------

def two_layers(seed: int = 0) -> ALQInit:
    """Two Linear(32, 32) layers ("0" and "2"), 3 slots, initialised at 3.0 bits (2048 weights, 6144 bits)."""
    torch.manual_seed(seed)
    init = ALQInit(max_bits=3)
    init.setup(SimpleNamespace(strategy=object(), callbacks=[]),
               nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)), "fit")
    init.network.initialize()
    assert (init.network.binary_bits, init.network.numel) == (6144, 2048)
    return init


def one_step(step: int = 0) -> SimpleNamespace:
    """A Trainer in the only optimizer step of a one-epoch window."""
    return SimpleNamespace(global_step=step, num_training_batches=1, accumulate_grad_batches=1, current_epoch=0)


def gradients(init: ALQInit, names=("0", "2")) -> frozenset[str]:
    """Random gradients of ``names`` put into the network's buckets; the layers that have one."""
    g = torch.Generator().manual_seed(1)
    return init.network.load_grads({name: torch.randn(32, 32, generator=g) for name in names})


def test_half_a_bit_over_the_budget_is_pruned():
    init = two_layers()
    stage = BitwidthReduction(0, (6144 - 0.5) / 2048)
    stage.bind(init)
    stage.apply(one_step(), gradients(init))
    assert init.network.binary_bits == 6144 - 32


def test_a_step_within_its_budget_prunes_nothing_and_warns_about_nothing(recwarn):
    init = two_layers()
    slots = torch.zeros(32, 3, dtype=torch.bool)
    slots[0, 0] = True
    init.network.clear_slots({"0": slots})
    stage = BitwidthReduction(0, 6112 / 2048)
    stage.bind(init)
    stage.apply(one_step(), gradients(init, ("0",)))
    assert init.network.binary_bits == 6112
    assert not recwarn.list


def test_layers_without_a_gradient_are_named_once_while_the_others_are_pruned(recwarn):
    init = two_layers()
    stage = BitwidthReduction(0, 2.0, epochs=2)
    stage.bind(init)
    trainer = SimpleNamespace(num_training_batches=1, accumulate_grad_batches=1, current_epoch=0)
    for step in (0, 1):
        trainer.global_step = step
        stage.apply(trainer, gradients(init, ("0",)))
    messages = [str(w.message) for w in recwarn.list]
    assert messages == ["BitwidthReduction: layers ['2'] have not received a gradient yet; they keep their bits "
                        "while the other layers are pruned"]
    assert init.network.binary_bits <= 2.0 * 2048
    assert int(init.network.layers["2"].state.mask.sum()) == 96


@pytest.mark.parametrize("kind", [BitwidthReduction, GroupPruning])
def test_an_unreachable_budget_names_the_layers_that_hold_the_bits(kind):
    init = two_layers()
    stage = kind(0, 0.25)
    stage.bind(init)
    with pytest.warns(UserWarning, match=rf"^{kind.__name__}: layers \['2'\] have not received"):
        with pytest.raises(RuntimeError) as error:
            stage.apply(one_step(3), gradients(init, ("0",)))
    assert str(error.value) == (
        f"{kind.__name__} cannot reach 0.2500 average bits at step 3: every prunable slot is gone and the layers "
        f"that never received a gradient, ['2'], hold 3072 of the 3072 bits left; make them take part in the loss "
        f"or leave them in float (exclude=[...])")


def test_a_non_finite_gradient_is_skipped_with_a_warning_naming_the_stage():
    init = two_layers()
    network = init.network
    before = network.state_tensors()
    network.layers["0"].param.grad = torch.full((32, 32), float("nan"))
    network.layers["2"].param.grad = torch.ones(32, 32)
    stage = CoordinateRefit(0, 1)
    stage.bind(init)
    trainer = SimpleNamespace(current_epoch=0, global_step=4, gradient_clip_val=None, gradient_clip_algorithm=None)
    module = nn.Sequential(*(layer.module for layer in network.layers.values()))  # the model the layers are in
    module.automatic_optimization = True
    module.configure_gradient_clipping = lambda *args, **kwargs: None
    stage.on_before_optimizer_step(trainer, module, None)
    with pytest.warns(UserWarning) as warned:
        stage.on_train_epoch_end(trainer, module)
    assert [str(w.message) for w in warned] == [
        "CoordinateRefit: skipped 1 ALQ update(s) in epoch 0: a quantized weight's gradient was not finite"]
    assert network.skipped == 0, "the count starts afresh each epoch"
    assert all(layer.param.grad is None for layer in network.layers.values())
    for name, tensors in network.state_tensors().items():
        assert all(torch.equal(t, before[name][key]) for key, t in tensors.items()), name
