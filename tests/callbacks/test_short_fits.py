"""Fits too short for an epoch per stage: ``fast_dev_run``, one epoch with ``limit_train_batches``, ``max_steps``
only. The schedule is laid over optimizer steps (every stage for a step under ``fast_dev_run``), the run ends at
``target_bits``, resumes exactly, and a fit that ends before its schedule says so."""
from __future__ import annotations

import itertools

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from alq_lightning import ALQCallback, STEFineTune
from alq_lightning.core import fit_schedule
from alq_lightning.data.tensor_loader import TensorLoader

from tiny import Recorder, build, loader, make_data, record_core_calls, trainer

LR, DECAY, STE_LR, STE_DECAY = 1e-2, 0.5, 3e-3, 0.7
# One optimizer step of each stage, in schedule order: (core calls, lr of the step's lr-taking calls).
STAGE_CALLS = [
    (["basis_step"], LR),
    (["coordinate_step"], LR * DECAY),
    (["observe", "quadratic_model"], LR * DECAY**2),
    (["ste_step"], STE_LR),
    (["coordinate_step"], STE_LR * STE_DECAY),
]


def callback(**kwargs) -> ALQCallback:
    return ALQCallback(target_bits=0.8, max_bits=3, lr=LR, lr_decay=DECAY, ste_lr=STE_LR, ste_lr_decay=STE_DECAY,
                       **kwargs)


def run(monkeypatch, alq: ALQCallback, kind: str = "cnn", **trainer_kwargs) -> tuple[Recorder, object]:
    recorder = Recorder(alq)
    record_core_calls(monkeypatch, recorder)
    max_epochs = trainer_kwargs.pop("max_epochs", None)
    fit = trainer([alq, recorder], max_epochs, **trainer_kwargs)
    fit.fit(build(kind), loader(n=256, batch_size=16))
    return recorder, fit


def names(calls) -> list[str]:
    """Core function names, one per bucket-wide call (consecutive repeats over buckets collapsed)."""
    return [name for name, _ in itertools.groupby(call.name for call in calls)]


def lrs(calls) -> set[float]:
    return {call.lr for call in calls if call.lr is not None}


def ends_at_target(alq: ALQCallback) -> None:
    network = alq.network
    slot = max(layer.layout.group_size for layer in network.layers.values())
    assert alq.target_bits * network.numel - slot < network.binary_bits <= alq.target_bits * network.numel
    assert all(layer.buffer("latent").numel() == 0 for layer in network.layers.values()), "STE ended"


def test_fast_dev_run_runs_every_stage_in_its_one_step_in_schedule_order(monkeypatch):
    alq = callback()
    recorder, fit = run(monkeypatch, alq, fast_dev_run=True)
    assert fit.global_step == 1 and len(recorder.steps) == 1 and recorder.stray == []
    (step,) = recorder.steps
    assert names(step.calls) == [name for calls, _ in STAGE_CALLS for name in calls]
    for calls, lr in STAGE_CALLS:
        taken = [call for call in step.calls if call.name in calls]
        assert lr in lrs(taken), (calls, lrs(taken))
    ends_at_target(alq)


@pytest.mark.parametrize("steps", [3, 5, 7])
def test_fast_dev_run_gives_each_stage_a_step_sharing_the_last_when_short(monkeypatch, steps):
    alq = callback(rounds=4, ste_epochs=9)  # a given schedule is set aside under fast_dev_run
    recorder, fit = run(monkeypatch, alq, fast_dev_run=steps)
    assert fit.global_step == min(steps, 5) == len(recorder.steps)
    for index, step in enumerate(recorder.steps):
        share = STAGE_CALLS[index:] if index == steps - 1 else [STAGE_CALLS[index]]
        assert names(step.calls) == [name for calls, _ in share for name in calls], index
        assert lrs(step.calls) == {lr for _, lr in share}, index
    ends_at_target(alq)


@pytest.mark.parametrize(("trainer_kwargs", "steps"), [
    ({"max_epochs": 1, "limit_train_batches": 12}, 12),
    ({"max_epochs": 1, "limit_train_batches": 12, "accumulate_grad_batches": 2}, 6),
    ({"max_steps": 9}, 9),
])
def test_a_fit_of_one_epoch_or_of_max_steps_takes_the_fitted_schedule_over_its_steps(monkeypatch, trainer_kwargs,
                                                                                       steps):
    alq = callback()
    recorder, fit = run(monkeypatch, alq, **trainer_kwargs)
    schedule = fit_schedule(steps)
    assert alq.schedule == schedule and alq.unit == "step" and alq.total_epochs == steps == fit.global_step
    expected = []
    for _ in range(schedule["rounds"]):
        expected += ["basis"] * schedule["basis_epochs"] + ["coordinate"] * schedule["coordinate_epochs"]
        expected += ["pruning"] * schedule["pruning_epochs"]
    expected += ["ste"] * schedule["ste_epochs"] + ["coordinate"] * schedule["final_coordinate_epochs"]
    stage_of = {"basis_step": "basis", "ste_step": "ste", "coordinate_step": "coordinate", "observe": "pruning"}
    assert [stage_of[names(step.calls)[0]] for step in recorder.steps] == expected
    ends_at_target(alq)


def test_a_fit_with_fewer_than_two_steps_is_refused_with_its_numbers():
    with pytest.raises(ValueError, match=r"Trainer\(max_epochs=1, max_steps=-1\) gives 1 optimizer steps; an ALQ "
                                         r"schedule needs at least 2 epochs, or 2 steps within one"):
        trainer([callback()], 1, limit_train_batches=1).fit(build("mlp"), loader())


def test_a_fit_that_ends_before_the_schedule_says_so():
    alq = callback(rounds=1, basis_epochs=1, coordinate_epochs=1, ste_epochs=0, final_coordinate_epochs=0)
    with pytest.warns(UserWarning, match=r"the fit ended at epoch 1, step 4, before the ALQ schedule of 3 epochs was "
                                         r"complete: the model holds 3\.0000 average bits, not target_bits=0\.8"):
        trainer([alq], alq.total_epochs, max_steps=4).fit(build("mlp"), loader())


def resumable_loader() -> TensorLoader:
    x, y = make_data("image").tensors
    return TensorLoader(x, y, 16, shuffle=True, seed=1)


@pytest.mark.parametrize("step", [3, 6, 9, 12])
def test_a_schedule_over_steps_resumes_exactly(tmp_path, step):
    """16 steps in one epoch: fit_schedule(16) gives every stage a window; resume mid-epoch from any of them."""
    def fit(ckpt_path=None, saver=None):
        alq = callback()
        extra = dict(enable_checkpointing=True) if saver else {}
        trainer([alq, *([saver] if saver else [])], 1, **extra).fit(build("cnn"), resumable_loader(),
                                                                     ckpt_path=ckpt_path)
        return {name: (layer.state.codes.clone(), layer.state.coords.clone(), layer.state.mask.clone())
                for name, layer in alq.network.layers.items()}

    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    reference = fit(saver=saver)
    resumed = fit(ckpt_path=tmp_path / f"step={step}.ckpt")
    for name, tensors in reference.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, resumed[name])), name


def test_the_paper_preset_keeps_its_225_epochs_and_refuses_a_shorter_trainer():
    alq = ALQCallback.paper(0.7, max_bits=3, ste_epochs=40)
    assert alq.schedule == {"rounds": 5, "basis_epochs": 20, "coordinate_epochs": 10, "pruning_epochs": 1,
                            "ste_epochs": 40, "final_coordinate_epochs": 20}
    assert (alq.target_bits, alq.total_epochs, alq.fits_trainer) == (0.7, 215, False)
    with pytest.raises(ValueError, match=r"Trainer\(max_epochs=100\) cannot hold the ALQ schedule of 225 epochs"):
        trainer([ALQCallback.paper()], 100).fit(build("mlp"), loader())


class QuantizedInputs(Callback):
    """The optimizer steps (0-based) whose forward quantized every input the callback quantizes."""

    def __init__(self, alq: ALQCallback) -> None:
        self.alq, self.steps = alq, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        layers = self.alq.activations.layers.values()
        if layers and all(layer.enabled and layer.ready for layer in layers):
            self.steps.append(self.step)


@pytest.mark.parametrize("act_start", ["start", "ste"])
@pytest.mark.parametrize("fit", [{"fast_dev_run": True}, {"fast_dev_run": 5}, {"max_steps": 10},
                                 {"max_epochs": 1, "limit_train_batches": 10}], ids=str)
def test_quantized_inputs_start_at_their_step_of_a_short_fit(act_start, fit):
    alq = callback(act_bits=2, act_start=act_start)
    inputs = QuantizedInputs(alq)
    fit = dict(fit)
    trained = trainer([alq, inputs], fit.pop("max_epochs", None), **fit)
    trained.fit(build("cnn"), loader(n=256, batch_size=16))
    (ste,) = [stage for stage in alq.stages if isinstance(stage, STEFineTune)]
    first = 0 if act_start == "start" else ste.start_epoch
    assert alq.activations.unit == "step" and inputs.steps == list(range(first, trained.global_step))
    assert act_start == "start" or 0 < first < trained.global_step - 1 or fit.get("fast_dev_run") is True
