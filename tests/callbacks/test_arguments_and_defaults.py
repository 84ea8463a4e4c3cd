"""The callbacks' documented defaults, the arguments they pass on, and their argument errors, which name the
argument, its value and what is allowed (``<name>=<value> is not allowed; expected <allowed>``)."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from alq_lightning import (
    ALQCallback,
    ALQInit,
    BasisRefit,
    BitwidthReduction,
    CoordinateRefit,
    GroupPruning,
    STEFineTune,
)
from alq_lightning.core import QuadraticConfig

from tiny import build, loader, trainer

KEYS = ("codes", "coords", "mask", "weight_m", "weight_v", "weight_vmax", "coord_m", "coord_v", "coord_vmax",
        "latent")


def short(**kwargs) -> ALQCallback:
    options = dict(target_bits=0.8, max_bits=3, rounds=1, basis_epochs=1, coordinate_epochs=1, ste_epochs=0,
                   final_coordinate_epochs=0)
    options.update(kwargs)
    return ALQCallback(**options)


def error_of(factory, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        factory(*args, **kwargs)
    return str(error.value)


# Defaults --------------------------------------------------------------------------------------------------

def test_alqcallback_defaults_are_the_papers_schedule():
    """``max_bits=6``, five rounds of 20 basis, 10 coordinate and 1 pruning epochs at ``lr=1e-3`` decaying by
    0.8, 50 STE epochs at 1e-3 decaying by 0.95, 20 final coordinate epochs continuing from STE's rate and
    decaying by 0.9; AMSGrad constants 0.9 / 0.999 / 1e-8; every weight matrix selected."""
    alq = ALQCallback(target_bits=1.0)
    selection = alq.init.selection
    assert selection.max_bits == 6
    assert (selection.include, selection.exclude, selection.types) == (("*",), (), None)
    assert (selection.structures, selection.max_bits_overrides) == ({}, {})
    assert (selection.keep_first, selection.keep_last) == (False, False)
    assert alq.init.config == QuadraticConfig(beta1=0.9, beta2=0.999, eps=1e-8)
    expected = []
    for round_index in range(5):
        start = 31 * round_index
        expected += [(BasisRefit, start, 20, 1e-3, 0.8), (CoordinateRefit, start + 20, 10, 1e-3 * 0.8**20, 0.8),
                     (BitwidthReduction, start + 30, 1, 1e-3 * 0.8**30, 0.8)]
    expected += [(STEFineTune, 155, 50, 1e-3, 0.95), (CoordinateRefit, 205, 20, 1e-3 * 0.95**50, 0.9)]
    assert [(type(s), s.start_epoch, s.epochs) for s in alq.stages] == [e[:3] for e in expected]
    assert [s.lr for s in alq.stages] == pytest.approx([e[3] for e in expected], rel=1e-12)
    assert [s.lr_decay for s in alq.stages] == [e[4] for e in expected]
    pruning = [s for s in alq.stages if isinstance(s, BitwidthReduction)]
    assert [(s.target_bits, s.rounds, s.round_index, s.per_bit) for s in pruning] == [
        (1.0, 5, index, False) for index in range(1, 6)]
    assert alq.total_epochs == 225


def test_alqcallback_passes_the_selection_and_model_constants_to_its_alqinit():
    alq = short(keep_first=True, keep_last=True, beta1=0.5, beta2=0.75, eps=1e-3, types=["Linear"],
                exclude=["net.0"], include=["net.*"], max_bits_overrides={"net.3": 2},
                structures={"net.3": "channelwise"})
    selection = alq.init.selection
    assert (selection.keep_first, selection.keep_last) == (True, True)
    assert (selection.include, selection.exclude, selection.types) == (("net.*",), ("net.0",), ("Linear",))
    assert (selection.structures, selection.max_bits_overrides) == ({"net.3": "channelwise"}, {"net.3": 2})
    assert alq.init.config == QuadraticConfig(beta1=0.5, beta2=0.75, eps=1e-3)


def test_alqcallback_binds_its_stages_to_its_own_alqinit():
    alq = short(ste_epochs=1, final_coordinate_epochs=1)
    assert all(stage.init is alq.init for stage in alq.stages)
    assert all(stage.network is None for stage in alq.stages)


def test_alqinit_defaults():
    init = ALQInit()
    selection = init.selection
    assert selection.max_bits == 6
    assert (selection.include, selection.exclude, selection.types) == (("*",), (), None)
    assert (selection.keep_first, selection.keep_last) == (False, False)
    assert init.config == QuadraticConfig(beta1=0.9, beta2=0.999, eps=1e-8)
    assert init.network is None
    assert init.state_dict() == {"initialized": False}


def test_alqinit_sets_up_the_layers_and_the_model_it_was_given():
    init = ALQInit(max_bits=2, keep_first=True, beta1=0.5, beta2=0.75, eps=1e-3)
    assert init.selection.keep_first is True and init.selection.keep_last is False
    module = build("mlp")
    init.setup(trainer([init], 1), module, "fit")
    assert list(init.network.layers) == ["net.3"]
    assert init.network.float_layers == {"net.1": "first layer kept in float"}
    assert init.network.config == QuadraticConfig(beta1=0.5, beta2=0.75, eps=1e-3)
    assert init.state_dict() == {"initialized": False, "initial_bits": 0.0}


def test_alqinit_loads_its_state_before_it_is_set_up():
    init = ALQInit()
    init.load_state_dict({"initialized": True, "initial_bits": 2.5})
    assert init.initialized is True and init.network is None


@pytest.mark.parametrize(
    ("stage", "lr", "lr_decay"),
    [(BasisRefit(0, 2), 1e-3, 1.0), (CoordinateRefit(3, 2), 1e-3, 1.0), (STEFineTune(0, 2), 1e-3, 0.95)],
    ids=["basis", "coordinate", "ste"],
)
def test_stage_learning_rate_defaults(stage, lr, lr_decay):
    assert (stage.lr, stage.lr_decay) == (lr, lr_decay)
    assert stage.init is None


def test_bitwidth_reduction_defaults_to_one_epoch_of_the_only_round():
    for kind in (BitwidthReduction, GroupPruning):
        stage = kind(4, 1.5)
        assert (stage.start_epoch, stage.target_bits, stage.epochs, stage.rounds, stage.round_index) == (
            4, 1.5, 1, 1, 1)
        assert (stage.lr, stage.lr_decay, stage.per_bit) == (1e-3, 1.0, False)
        assert stage.state_dict() == {"window_start_step": None}


def test_ste_has_not_started_before_its_window():
    assert STEFineTune(0, 1).state_dict() == {"started": False}


# Argument errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(basis_epochs=-1), "basis_epochs=-1 is not allowed; expected an integer >= 0"),
        (dict(coordinate_epochs=-1), "coordinate_epochs=-1 is not allowed; expected an integer >= 0"),
        (dict(ste_epochs=1.5), "ste_epochs=1.5 is not allowed; expected an integer >= 0"),
        (dict(final_coordinate_epochs=-2), "final_coordinate_epochs=-2 is not allowed; expected an integer >= 0"),
        (dict(start_epoch=-1), "start_epoch=-1 is not allowed; expected an integer >= 0"),
        (dict(start_epoch=True), "start_epoch=True is not allowed; expected an integer >= 0"),
        (dict(rounds=0), "rounds=0 is not allowed; expected an integer >= 1"),
        (dict(rounds=2.0), "rounds=2.0 is not allowed; expected an integer >= 1"),
        (dict(pruning_epochs=0), "pruning_epochs=0 is not allowed; expected an integer >= 1"),
        (dict(pruning="rows"), "pruning='rows' is not allowed; expected one of ['coordinates', 'groups']"),
        (dict(pruning="groups", per_bit=True),
         "per_bit=True is not allowed; expected False with pruning='groups' (groups are always ranked per bit)"),
        (dict(lr=0), "lr=0 is not allowed; expected a number > 0"),
        (dict(ste_epochs=1, ste_lr_decay=0.0), "lr_decay=0.0 is not allowed; expected a number in (0, 1]"),
        (dict(target_bits=3), "target_bits=3 must be a number in (0, max_bits=3)"),
    ],
)
def test_alqcallback_argument_errors(kwargs, message):
    assert error_of(short, **kwargs) == message


@pytest.mark.parametrize("kind", [BasisRefit, CoordinateRefit, STEFineTune])
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 1), "start_epoch=-1 is not allowed; expected an integer >= 0"),
        ((1.0, 1), "start_epoch=1.0 is not allowed; expected an integer >= 0"),
        ((0, 0), "epochs=0 is not allowed; expected an integer >= 1"),
        ((0, 2.0), "epochs=2.0 is not allowed; expected an integer >= 1"),
        ((0, 1, 0), "lr=0 is not allowed; expected a number > 0"),
        ((0, 1, -1e-3), "lr=-0.001 is not allowed; expected a number > 0"),
        ((0, 1, True), "lr=True is not allowed; expected a number > 0"),
        ((0, 1, "0.1"), "lr='0.1' is not allowed; expected a number > 0"),
        ((0, 1, 1e-3, 0), "lr_decay=0 is not allowed; expected a number in (0, 1]"),
        ((0, 1, 1e-3, 1.5), "lr_decay=1.5 is not allowed; expected a number in (0, 1]"),
    ],
)
def test_stage_argument_errors(kind, args, message):
    assert error_of(kind, *args) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(target_bits=0), "target_bits=0 is not allowed; expected a number > 0"),
        (dict(target_bits=-1.0), "target_bits=-1.0 is not allowed; expected a number > 0"),
        (dict(target_bits="1"), "target_bits='1' is not allowed; expected a number > 0"),
        (dict(rounds=0), "rounds=0 is not allowed; expected an integer >= 1"),
        (dict(rounds=2.0), "rounds=2.0 is not allowed; expected an integer >= 1"),
        (dict(rounds=2, round_index=3), "round_index=3 is not allowed; expected an integer in [1, rounds=2]"),
        (dict(rounds=2, round_index=0), "round_index=0 is not allowed; expected an integer in [1, rounds=2]"),
        (dict(round_index=1.0), "round_index=1.0 is not allowed; expected an integer in [1, rounds=1]"),
        (dict(epochs=0), "epochs=0 is not allowed; expected an integer >= 1"),
    ],
)
def test_pruning_stage_argument_errors(kwargs, message):
    options = dict(start_epoch=0, target_bits=1.0)
    options.update(kwargs)
    for kind in (BitwidthReduction, GroupPruning):
        assert error_of(kind, **options) == message


@pytest.mark.parametrize(
    ("max_bits", "overrides", "target_bits", "message"),
    [
        (2, {}, 2.0, "target_bits=2.0 is not allowed; expected a number in (0, max_bits=2)"),
        (2, {}, 2.5, "target_bits=2.5 is not allowed; expected a number in (0, max_bits=2)"),
        (2, {"net.3": 4}, 4, "target_bits=4.0 is not allowed; expected a number in (0, max_bits=4)"),
        (2, {"net.3": 4}, 3.5, None),
    ],
)
def test_a_standalone_pruning_stage_checks_its_target_against_the_widest_layer(max_bits, overrides, target_bits,
                                                                               message):
    """The stage finds the Trainer's ALQInit at setup and refuses a target at or above the widest layer's
    ``max_bits``."""
    init = ALQInit(max_bits=max_bits, max_bits_overrides=overrides)
    stage = BitwidthReduction(0, target_bits)
    run = trainer([init, stage], 1)
    module = build("mlp")
    init.setup(run, module, "fit")
    if message is None:
        stage.setup(run, module, "fit")
    else:
        assert error_of(stage.setup, run, module, "fit") == message
    assert stage.init is init


def test_a_pruning_stage_needs_a_dataloader_with_a_length():
    stage = BitwidthReduction(0, 1.0, epochs=2)
    assert stage.steps_per_epoch(SimpleNamespace(num_training_batches=5, accumulate_grad_batches=2)) == 3
    message = error_of(stage.steps_per_epoch, SimpleNamespace(num_training_batches=float("inf"),
                                                              accumulate_grad_batches=1))
    assert message == ("BitwidthReduction spreads pruning over the optimizer steps of an epoch, so the training "
                       "dataloader needs a length (num_training_batches=inf)")


# Trainer checks and state --------------------------------------------------------------------------------

@pytest.mark.parametrize("max_epochs", [0, 2])
def test_a_fit_shorter_than_the_schedule_is_refused(max_epochs):
    alq = short()
    assert alq.total_epochs == 3
    fit = SimpleNamespace(max_epochs=max_epochs, max_steps=-1, fast_dev_run=0)
    message = error_of(alq.setup, fit, build("mlp"), "fit")
    assert message == (f"Trainer(max_epochs={max_epochs}) cannot hold the ALQ schedule of 3 epochs; set "
                       f"Trainer(max_epochs=3) (see ALQCallback(...).total_epochs)")


@pytest.mark.parametrize(("max_epochs", "stage"), [(-1, "fit"), (None, "fit"), (3, "fit"), (0, "validate"),
                                                    (1, "test")])
def test_an_unbounded_fit_or_an_evaluation_is_not_refused(max_epochs, stage):
    alq = short()
    module = build("mlp")
    alq.setup(SimpleNamespace(max_epochs=max_epochs, max_steps=-1, fast_dev_run=0, strategy=object(),
                              callbacks=[], progress_bar_callback=None), module, stage)
    assert list(alq.network.layers) == ["net.1", "net.3"]


@pytest.mark.parametrize("change", [-1, 1])
def test_callback_state_of_another_schedule_is_refused(change):
    alq = short(ste_epochs=1)
    state = alq.state_dict()
    assert state == {"init": {"initialized": False},
                     "stages": [{}, {}, {"window_start_step": None}, {"started": False}]}
    state["stages"] = state["stages"][:change] if change < 0 else [*state["stages"], {}]
    with pytest.raises(ValueError, match="zip()"):
        alq.load_state_dict(state)


def test_alqinit_setup_lists_its_buffers_for_ddp_to_ignore(caplog):
    """DDP must not broadcast the multi-bit buffers: their names are added to what the module already ignores."""
    module = build("mlp")
    module._ddp_params_and_buffers_to_ignore = ["keep.me"]
    init = ALQInit(max_bits=2)
    with caplog.at_level(logging.INFO):
        init.setup(trainer([init], 1), module, "fit")
    expected = [f"net.{index}.alq_{key}" for index in (1, 3) for key in KEYS]
    assert module._ddp_params_and_buffers_to_ignore == ["keep.me", *expected]
    assert set(expected) <= set(dict(module.named_buffers()))
    assert "ALQ quantizes 2 layers; left in float: none" in caplog.messages


def test_alqinit_set_up_for_another_module_starts_afresh(caplog):
    init = ALQInit(max_bits=2)
    run = trainer([init], 1)
    first = build("mlp")
    init.setup(run, first, "fit")
    with caplog.at_level(logging.INFO):
        init.on_fit_start(run, first)
    layers = init.network.layers.values()
    expected = sum(int(layer.state.mask.sum()) * layer.layout.group_size for layer in layers) / sum(
        layer.layout.numel for layer in layers)
    assert any(message.startswith(f"ALQ initialised at {expected:.3f} average bits\n")
               for message in caplog.messages), caplog.messages
    assert init.state_dict() == {"initialized": True, "initial_bits": expected}
    caplog.clear()
    second = build("mlp", seed=1)
    with caplog.at_level(logging.INFO):
        init.setup(run, second, "fit")
    assert "ALQ sets up afresh for a new TinyModule: the state of the earlier model stays with it" in caplog.messages
    assert init.network.belongs_to(second)
    assert init.state_dict() == {"initialized": False, "initial_bits": 0.0}
    assert init.initialized is False


def test_the_callback_works_out_of_the_box(caplog):
    """``Trainer(callbacks=[ALQCallback()])``: one bit per weight on average with the paper's 225-epoch schedule,
    stated at setup at INFO (what Lightning prints); under Lightning's default ``max_epochs`` (1000) the fit, and
    with it the progress bar, takes the schedule's 225 epochs."""
    torch.manual_seed(0)
    alq = ALQCallback()
    assert (alq.target_bits, alq.total_epochs) == (1.0, 225)
    run = L.Trainer(callbacks=[alq], accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_train_batches=1,
                    limit_val_batches=0)
    with caplog.at_level(logging.INFO):
        run.fit(build("mlp"), loader(n=32, batch_size=16))
    assert ("ALQ schedule: 5 rounds × (20 basis + 10 coordinate + 1 pruning), 50 STE, 20 final coordinate epochs "
            "(225 in all), to 1 average bits; the fit ends with it after epoch 224 (Trainer(max_epochs) was "
            "Lightning's default)") in caplog.messages
    assert run.max_epochs == 225 and run.current_epoch == 225
    slot = max(layer.layout.group_size for layer in alq.network.layers.values()) / alq.network.numel
    assert 1.0 - slot < alq.network.avg_bits <= 1.0


def quick_trainer(alq: ALQCallback, max_epochs: int) -> L.Trainer:
    return L.Trainer(callbacks=[alq], max_epochs=max_epochs, accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_train_batches=2, limit_val_batches=0)


def test_without_a_schedule_the_callback_fits_the_trainers_epochs(caplog):
    """``ALQCallback()`` in ``Trainer(max_epochs=10)``: the paper's proportions scaled into 10 epochs (2 rounds of
    2 basis + 1 coordinate + 1 pruning, 2 STE), stated in the log; the fit reaches the target in those epochs."""
    torch.manual_seed(0)
    alq = ALQCallback()
    run = quick_trainer(alq, 10)
    with caplog.at_level(logging.INFO):
        run.fit(build("mlp"), loader(n=32, batch_size=16))
    assert ("ALQ schedule fitted into Trainer(max_epochs=10): 2 rounds × (2 basis + 1 coordinate + 1 pruning), "
            "2 STE, 0 final coordinate epochs (10 in all)") in caplog.text
    assert alq.total_epochs == 10 and run.current_epoch == 10
    kinds = [(type(stage).__name__, stage.start_epoch, stage.epochs) for stage in alq.stages]
    assert kinds == [("BasisRefit", 0, 2), ("CoordinateRefit", 2, 1), ("BitwidthReduction", 3, 1),
                     ("BasisRefit", 4, 2), ("CoordinateRefit", 6, 1), ("BitwidthReduction", 7, 1),
                     ("STEFineTune", 8, 2)]
    assert alq.network.avg_bits <= 1.0


def test_a_fitted_schedule_starts_at_start_epoch_and_needs_two_epochs():
    alq = ALQCallback(start_epoch=2)
    quick_trainer(alq, 5).fit(build("mlp"), loader(n=32, batch_size=16))
    assert alq.schedule == {"rounds": 1, "basis_epochs": 1, "coordinate_epochs": 1, "pruning_epochs": 1,
                            "ste_epochs": 0, "final_coordinate_epochs": 0}
    assert alq.total_epochs == 5 and alq.stages[0].start_epoch == 2
    with pytest.raises(ValueError, match=r"Trainer\(max_epochs=3\) leaves 1 epochs after start_epoch=2; an ALQ "
                                         r"schedule needs at least 2 \(one basis, one pruning epoch\)"):
        quick_trainer(ALQCallback(start_epoch=2), 3).fit(build("mlp"), loader(n=32, batch_size=16))


def test_a_schedule_given_in_part_takes_the_papers_other_values_and_is_not_fitted():
    alq = ALQCallback(rounds=2)
    assert alq.schedule == {"rounds": 2, "basis_epochs": 20, "coordinate_epochs": 10, "pruning_epochs": 1,
                            "ste_epochs": 50, "final_coordinate_epochs": 20}
    with pytest.raises(ValueError, match=r"Trainer\(max_epochs=10\) cannot hold the ALQ schedule of 132 epochs"):
        quick_trainer(alq, 10).fit(build("mlp"), loader(n=32, batch_size=16))
