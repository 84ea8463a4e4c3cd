"""Stage behaviour at the Lightning hooks: BatchNorm during pruning, the STE latent start, gradient accumulation
and bf16 AMP at the callback level."""
from __future__ import annotations

import inspect

import torch
from lightning.pytorch import Callback
from torch import nn

import alq_lightning.network as network_module
from alq_lightning import ALQCallback

from tiny import Recorder, build, loader, record_core_calls, trainer


def short(**kwargs) -> ALQCallback:
    options = dict(max_bits=3, rounds=1, basis_epochs=1, coordinate_epochs=1, ste_epochs=1, final_coordinate_epochs=1)
    options.update(kwargs)
    return ALQCallback(0.8, **options)


class NormWatch(Callback):
    """Placed after ALQCallback: per training step, the BatchNorm modes seen by forward, the modes after the step,
    and whether the running statistics moved."""

    def __init__(self) -> None:
        self.rows = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.norms = [m for m in pl_module.modules() if isinstance(m, nn.BatchNorm2d)]
        for module in self.norms:
            module.register_forward_pre_hook(lambda module, args: self.seen.append(module.training))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen = []
        self.stats = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in self.norms]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        moved = any(not torch.equal(mean, m.running_mean) or not torch.equal(var, m.running_var)
                    or count != int(m.num_batches_tracked) for (mean, var, count), m in zip(self.stats, self.norms))
        self.rows.append((trainer.current_epoch, tuple(self.seen), tuple(m.training for m in self.norms), moved))


def test_batchnorm_uses_running_statistics_only_during_pruning_steps():
    """Pruning epochs (2 and 5 of two rounds of basis, coordinate, pruning): every BatchNorm runs in eval mode and
    its running statistics stay unchanged; it is back in train mode after each step; in every other epoch it
    trains and its statistics move."""
    alq = short(rounds=2, ste_epochs=0)
    watch = NormWatch()
    trainer([alq, watch], alq.total_epochs).fit(build("cnn"), loader(n=32, batch_size=16))
    assert len(watch.rows) == 2 * alq.total_epochs
    for epoch, seen, after, moved in watch.rows:
        pruning = epoch in (2, 5)
        assert seen == (not pruning,) * 2, epoch
        assert after == (True, True), epoch
        assert moved != pruning, epoch


def test_ste_latent_weights_start_at_the_reconstruction(monkeypatch):
    """At the first STE step of each bucket the latent weights the core receives equal ŵ exactly; later they
    drift."""
    seen = {}
    original = network_module.weight_domain_step

    def weight_domain_step(bucket, *args, **kwargs):
        if kwargs.get("ste"):
            seen.setdefault(bucket.latent.data_ptr(), []).append(torch.equal(bucket.latent, bucket.reconstruct()))
        return original(bucket, *args, **kwargs)

    monkeypatch.setattr(network_module, "weight_domain_step", weight_domain_step)
    alq = short(ste_epochs=2, final_coordinate_epochs=0)
    trainer([alq], alq.total_epochs).fit(build("cnn"), loader(n=32, batch_size=16))
    assert len(seen) == len(alq.network.buckets) >= 1
    for equal in seen.values():
        assert len(equal) == 4 and equal[0] and not all(equal[1:])


class Accumulated(Callback):
    """Placed before ALQCallback: the micro-batches of the current optimizer step, and at the optimizer step the
    gradient of their losses (each divided by ``accumulate_grad_batches``, as Lightning does) by autograd."""

    def __init__(self, alq: ALQCallback) -> None:
        self.alq, self.batches, self.expected = alq, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        weights = [layer.param for layer in self.alq.network.layers.values()]
        loss = sum(nn.functional.cross_entropy(pl_module(x), y) for x, y in self.batches)
        grads = torch.autograd.grad(loss / trainer.accumulate_grad_batches, weights)
        self.expected.append((trainer.current_epoch, len(self.batches), [g.reshape(g.shape[0], -1) for g in grads]))
        self.batches = []


def test_gradient_accumulation_steps_alq_once_per_optimizer_step_with_the_accumulated_gradient(monkeypatch):
    """With ``accumulate_grad_batches=2`` over 5 batches an epoch (3 optimizer steps, the last of one batch): ALQ
    steps every layer exactly once per optimizer step, never between them, and the gradient a basis or coordinate
    step consumes is the gradient of all the step's micro-batch losses."""
    alq = short(max_bits=2, ste_epochs=0, final_coordinate_epochs=0)
    accumulated, recorder = Accumulated(alq), Recorder(alq)
    consumed = []
    record_core_calls(monkeypatch, recorder)
    for name in ("weight_domain_step", "coordinate_step"):
        wrapped = getattr(network_module, name)
        signature = inspect.signature(wrapped)

        def capture(*args, _wrapped=wrapped, _signature=signature, **kwargs):
            consumed.append(_signature.bind(*args, **kwargs).arguments["grad"].clone())
            return _wrapped(*args, **kwargs)

        monkeypatch.setattr(network_module, name, capture)
    trainer([accumulated, alq, recorder], alq.total_epochs, accumulate_grad_batches=2).fit(
        build("mlp"), loader(n=80, batch_size=16))
    buckets = len(alq.network.buckets)
    assert recorder.stray == []
    assert [len(step.calls) for step in recorder.steps[:6]] == [buckets] * 6
    assert len(recorder.steps) == 9 and all(len(step.calls) >= buckets for step in recorder.steps[6:])
    assert [count for _, count, _ in accumulated.expected] == [2, 2, 1] * 3
    stepped = [torch.cat([grad.reshape(-1) for grad in grads]) for epoch, _, grads in accumulated.expected
               if epoch < 2]
    assert buckets == 1 and len(consumed) == len(stepped) == 6
    for got, want in zip(consumed, stepped):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


class Reconstruction(Callback):
    """Placed after ALQCallback: after every step, whether each quantized weight equals ŵ exactly."""

    def __init__(self, alq: ALQCallback) -> None:
        self.alq, self.equal = alq, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.equal.append(all(
            torch.equal(layer.param.detach(), layer.layout.from_groups(layer.state.reconstruct()))
            for layer in self.alq.network.layers.values()))


def test_bf16_mixed_precision_keeps_the_weights_at_the_reconstruction(monkeypatch):
    """Under ``precision="bf16-mixed"`` on CPU every stage steps every layer each step, the multi-bit state stays
    float32 and finite, every quantized weight equals ŵ after every step, and the target is reached."""
    alq = short()
    recorder, check = Recorder(alq), Reconstruction(alq)
    record_core_calls(monkeypatch, recorder)
    trainer([alq, recorder, check], alq.total_epochs, precision="bf16-mixed").fit(
        build("cnn"), loader(n=32, batch_size=16))
    assert len(check.equal) == 2 * alq.total_epochs and all(check.equal)
    assert all(len(step.calls) >= len(alq.network.buckets) for step in recorder.steps)
    for layer in alq.network.layers.values():
        assert layer.param.dtype == torch.float32
        for key, tensor in layer.multibit_tensors().items():
            if key not in ("codes", "mask"):
                assert tensor.dtype == torch.float32 and bool(tensor.isfinite().all()), key
    assert alq.network.avg_bits <= 0.8
