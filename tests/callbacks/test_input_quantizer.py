"""The input quantizer of one layer (``alq_lightning/activations.py``) against its definition, batch by batch: the
first training batch fits the levels from uniform ones, every later one moves the running coordinates toward its
own refit by ``1 - momentum``; evaluation and no-grad forwards leave them alone; under DDP the refits (and the
choice of codes) are averaged over the ranks."""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Callback
from torch import nn

from alq_lightning import ActivationQuantization
from alq_lightning.activations import attach_activations
from alq_lightning.core.activations import fit_levels

from tiny import build, loader, trainer


def batches(count: int, seed: int = 0, shift: float = 0.0) -> list[torch.Tensor]:
    """``count`` batches ``[8, 6]`` of different scales (so that each refit moves the levels)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 6, generator=g) * (1 + i) + shift for i in range(count)]


def rows_of(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``x [B, C]`` as the quantizer sees it: one row per input channel, or one row."""
    return x.T.contiguous() if per_channel else x.reshape(1, -1)


def expected_coords(inputs: list[torch.Tensor], bits: int, momentum: float, per_channel: bool) -> torch.Tensor:
    """The running coordinates after ``inputs`` by the definition: the first batch's fit from uniform levels, then
    ``γ ← momentum · γ + (1 − momentum) · refit(batch, from γ)``."""
    signed = bool(inputs[0].min() < 0)
    coords = fit_levels(rows_of(inputs[0], per_channel), bits, signed, iterations=2)
    for x in inputs[1:]:
        refit = fit_levels(rows_of(x, per_channel), bits, signed, coords=coords, iterations=2)
        coords = momentum * coords + (1 - momentum) * refit
    return coords


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.3, 0.9])
def test_every_training_batch_moves_the_levels_toward_its_refit_by_one_minus_momentum(momentum, per_channel):
    """Five training batches: after each, the coordinates are the definition's (within float32 rounding: the
    library moves them with ``lerp``, the oracle with two products and a sum). The levels change at every batch."""
    torch.manual_seed(0)
    fc = nn.Linear(6, 3)
    layer = attach_activations({"fc": fc}, 3, per_channel=per_channel, momentum=momentum)["fc"]
    layer.enabled = True
    inputs = batches(5, shift=-0.2)
    seen = []
    for count in range(1, len(inputs) + 1):
        fc(inputs[count - 1])
        seen.append(layer.coords.clone())
        torch.testing.assert_close(layer.coords, expected_coords(inputs[:count], 3, momentum, per_channel),
                                   rtol=1e-5, atol=1e-6, msg=lambda m, c=count: f"after batch {c}: {m}")
    assert layer.signed
    assert all(not torch.equal(a, b) for a, b in zip(seen, seen[1:])), "each batch refits the levels"


def test_evaluation_and_no_grad_forwards_keep_the_levels():
    torch.manual_seed(0)
    fc = nn.Linear(6, 3)
    layer = attach_activations({"fc": fc}, 2)["fc"]
    layer.enabled = True
    first, second = batches(2)
    fc(first)
    fitted = layer.coords.clone()
    with torch.no_grad():
        fc(second)
    fc.eval()
    fc(second)
    assert torch.equal(layer.coords, fitted)
    fc.train()
    fc(second)
    assert not torch.equal(layer.coords, fitted)


class Record(Callback):
    """Per training batch of layer ``name``: its float input and the coordinates before and after the batch."""

    def __init__(self, quantizer: ActivationQuantization, name: str) -> None:
        self.quantizer, self.name, self.seen = quantizer, name, []

    def on_train_start(self, trainer, pl_module) -> None:
        module = pl_module.get_submodule(self.name)

        def before(module, args):
            if module.training and torch.is_grad_enabled():
                self.seen.append([args[0].detach().clone(), self.quantizer.layers[self.name].coords.clone()])

        def after(module, args, output):
            if module.training and torch.is_grad_enabled():
                self.seen[-1].append(self.quantizer.layers[self.name].coords.clone())

        self.handles = [module.register_forward_pre_hook(before, prepend=True), module.register_forward_hook(after)]

    def on_train_end(self, trainer, pl_module) -> None:
        for handle in self.handles:
            handle.remove()


def test_through_lightning_each_training_batch_of_every_epoch_refits_the_levels():
    """``ActivationQuantization`` in a Trainer, 2 epochs of 4 batches: at every training batch after the first the
    Linear's coordinates become ``momentum · before + (1 − momentum) · refit(batch, from before)``."""
    quantizer = ActivationQuantization(act_bits=2, momentum=0.8)
    record = Record(quantizer, "net.10")
    trainer([quantizer, record], 2, limit_val_batches=0).fit(build("cnn"), loader(n=128))
    assert len(record.seen) == 8
    layer = quantizer.layers["net.10"]
    assert not layer.signed, "the Linear reads a ReLU's output"
    x, _, after = record.seen[0]
    assert torch.equal(after, fit_levels(x.float().reshape(1, -1), 2, False, iterations=2))
    for index, (x, before, after) in enumerate(record.seen[1:], start=1):
        refit = fit_levels(x.float().reshape(1, -1), 2, False, coords=before, iterations=2)
        # lerp against two products and a sum: float32 rounding apart
        torch.testing.assert_close(after, 0.8 * before + 0.2 * refit, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, i=index: f"batch {i}: {m}")
        assert not torch.equal(after, before), index


# Two processes over gloo ---------------------------------------------------------------------------------------

def _rank(rank: int, store: str, inputs: dict, results: str) -> None:
    """One rank: quantizers on ``inputs[name][rank]``'s batches, every coordinate saved after each batch."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        modules = {name: nn.Linear(6, 3) for name in inputs}
        layers = {name: attach_activations({name: module}, 2, momentum=0.7)[name] for name, module in modules.items()}
        seen = {name: [] for name in inputs}
        for name, layer in layers.items():
            layer.enabled = True
            for x in inputs[name][rank]:
                modules[name](x)
                seen[name].append((layer.coords.clone(), layer.signed))
        torch.save(seen, f"{results}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_average_their_refits_and_agree_on_the_codes(tmp_path):
    """Ranks quantizing different batches end every batch with the same coordinates: the mean of the ranks' fits
    (first batch), then the running coordinates moved toward the mean of their refits. One rank alone sees no
    negative input (``"mixed"``): the codes are ±1 on both, since the other rank sees some."""
    inputs = {"mixed": [[x.abs() for x in batches(3, seed=1)], batches(3, seed=2)],
              "relu": [[x.relu() for x in batches(3, seed=3)], [2 * x.relu() for x in batches(3, seed=4)]]}
    args = (str(tmp_path / "store"), inputs, str(tmp_path / "rank"))
    other = mp.get_context("fork").Process(target=_rank, args=(1, *args))
    other.start()
    try:
        _rank(0, *args)  # in this process, so that a mutation run sees this test reach the averaging
    finally:
        other.join(timeout=60)
    assert other.exitcode == 0
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name, signed in (("mixed", True), ("relu", False)):
        per_rank = inputs[name]
        coords = sum(fit_levels(per_rank[r][0].reshape(1, -1), 2, signed, iterations=2) for r in (0, 1)) / 2
        for batch in range(3):
            if batch:
                refits = [fit_levels(per_rank[r][batch].reshape(1, -1), 2, signed, coords=coords, iterations=2)
                          for r in (0, 1)]
                coords = 0.7 * coords + 0.3 * (refits[0] + refits[1]) / 2
            for rank in (0, 1):
                found, found_signed = results[rank][name][batch]
                assert found_signed == signed, (name, batch, rank)
                # an all-reduce and lerp against the oracle's sums and products: float32 rounding apart
                torch.testing.assert_close(found, coords, rtol=1e-5, atol=1e-7,
                                           msg=lambda m, k=(name, batch, rank): f"{k}: {m}")
            assert torch.equal(results[0][name][batch][0], results[1][name][batch][0]), (name, batch)
