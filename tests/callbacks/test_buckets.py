"""Layers bound to flat buckets (``alq_lightning/buckets.py``): views that stay current, rebinding after the model's
tensors are replaced, and a step whose ops do not grow with the number of layers."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from alq_lightning import buckets
from alq_lightning import network as network_module
from alq_lightning.layers import LayerSelection, attach
from alq_lightning.network import MultiBitNetwork


def network_of(model: nn.Module, **selection) -> MultiBitNetwork:
    layers, float_layers = attach(model, LayerSelection(**{"max_bits": 3, **selection}))
    network = MultiBitNetwork(layers, float_layers)
    network.initialize()
    return network


def mlp(widths: list[int], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(a, b) for a, b in zip(widths, widths[1:])))


def backward(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(4, model[0].in_features, generator=gen)).square().sum().backward()


def reconstructed(network: MultiBitNetwork) -> bool:
    return all(torch.equal(layer.param.detach(), layer.layout.from_groups(layer.state.reconstruct()))
               for layer in network.layers.values())


def test_layers_share_a_bucket_per_max_bits_and_their_buffers_are_its_views():
    model = mlp([12, 10, 8, 6])
    network = network_of(model, max_bits_overrides={"1": 2})
    backward(model)
    network.basis_step(network.take_grads(), 1e-2)
    assert [bucket.names() for bucket in network.buckets] == [["0", "2"], ["1"]]
    for bucket in network.buckets:
        for layer, (rows, flat) in zip(bucket.layers, bucket.spans):
            assert torch.equal(layer.buffer("coords"), bucket.bucket.coords[rows])
            assert layer.buffer("weight_m").data_ptr() == bucket.bucket.weight_stats.m[flat].data_ptr()
    assert network.weight_steps == {"0": 1, "1": 1, "2": 1} and reconstructed(network)
    assert all(layer.param.grad is None for layer in network.layers.values())


def test_replaced_buffers_are_bound_afresh_with_their_state_counters_and_gathered_gradients():
    """``_apply`` replacing every tensor (as a move to another device does) breaks the views; the next step binds
    afresh from the replaced buffers, keeping the state, the step counters and the gradients already gathered."""
    model, twin = mlp([12, 10, 8]), mlp([12, 10, 8])
    network, twin_network = network_of(model), network_of(twin)
    backward(model)
    network.basis_step(network.take_grads(), 1e-2)
    twin_network.load_state_tensors(network.state_tensors())
    backward(model, seed=2)
    backward(twin, seed=2)
    names, twin_names = network.take_grads(), twin_network.take_grads()
    model._apply(lambda t: t.clone())
    assert not network.buckets[0].is_bound()
    network.basis_step(names, 1e-2)
    twin_network.basis_step(twin_names, 1e-2)
    assert network.buckets[0].is_bound() and network.weight_steps == {"0": 2, "1": 2}
    for (name, mine), theirs in zip(network.state_tensors().items(), twin_network.state_tensors().values()):
        for key, tensor in mine.items():
            assert torch.equal(tensor, theirs[key]), (name, key)
    assert reconstructed(network)


def test_a_non_finite_gradient_skips_the_step_and_a_layer_without_gradient_is_left_alone():
    """An inf gradient skips the whole step (counted in ``skipped``); at the next step the layer without a gradient
    keeps its state and its stale inf gradient no longer counts, so the other layer steps."""
    model = mlp([12, 10, 8])
    network = network_of(model)
    backward(model)
    network.basis_step(network.take_grads(), 1e-2)
    before = network.state_tensors()
    backward(model, seed=3)
    model[1].weight.grad[0, 0] = float("inf")
    network.coordinate_step(network.take_grads(), 1e-2)
    assert network.skipped == 1 and network.coord_steps == {"0": 1, "1": 1}
    assert all(torch.equal(t, network.state_tensors()[n][k]) for n, ts in before.items() for k, t in ts.items())
    backward(model, seed=4)
    model[1].weight.grad = None
    names = network.take_grads()
    network.coordinate_step(names, 1e-2)
    assert names == {"0"} and network.skipped == 1
    assert all(torch.equal(tensor, network.state_tensors()["1"][key]) for key, tensor in before["1"].items())
    assert network.coord_steps == {"0": 2, "1": 1} and reconstructed(network)


def step_ops(count, widths: list[int], kind: str):
    """The ATen ops of a second network step (``count`` is ``bench/bench_launches.py``'s counter)."""
    model = mlp(widths)
    network = network_of(model)
    step = {"basis": network.basis_step, "coordinate": network.coordinate_step, "ste": network.ste_step}[kind]
    if kind == "ste":
        network.start_ste()
    backward(model)
    step(network.take_grads(), 1e-2)
    backward(model)
    return count(lambda: step(network.take_grads(), 1e-2))


def test_a_network_step_launches_the_same_ops_for_two_layers_or_eight_and_never_reads_the_device(monkeypatch,
                                                                                                 bench_module):
    """In one block per bucket, as on a GPU (a CPU steps a layer's rows in cache-sized blocks)."""
    monkeypatch.setattr(buckets, "BLOCK", {})
    count = bench_module("bench_launches").count
    for kind in ("basis", "coordinate", "ste"):
        two = step_ops(count, [16, 12, 8], kind)
        eight = step_ops(count, [16, 12, 8, 24, 6, 10, 16, 4, 8], kind)
        assert two.ops == eight.ops, kind
        assert two.syncs == 0 and two.total > 0, kind


def test_a_compiled_step_equals_the_eager_step_up_to_float_rounding():
    """``compile=True`` (torch.compile, C++ kernels on a CPU): from one state and gradient, every kind of step gives
    the eager step's bases, masks and counters exactly and its coordinates and statistics to float rounding
    (rtol 1e-5, atol 1e-7: sums run in another order); the weights hold ŵ exactly."""
    pytest.importorskip("torch._inductor")
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile needs a C++ compiler on a CPU")
    model, twin = mlp([24, 16, 8]), mlp([24, 16, 8])
    eager, compiled = network_of(model), network_of(twin)
    compiled.compile = True
    for kind in ("basis", "coordinate", "observe", "ste"):
        backward(model, seed=5)
        grads = {name: layer.grad_groups().clone() for name, layer in eager.layers.items()}
        if kind == "ste":
            eager.start_ste()
            compiled.start_ste()
        compiled.load_state_tensors(eager.state_tensors())
        for network in (eager, compiled):
            step = getattr(network, "observe" if kind == "observe" else f"{kind}_step")
            args = (network.load_grads(grads),) if kind == "observe" else (network.load_grads(grads), 1e-2)
            step(*args)
        for (name, mine), theirs in zip(eager.state_tensors().items(), compiled.state_tensors().values()):
            for key, tensor in mine.items():
                if tensor.dtype in (torch.uint8, torch.bool, torch.long):
                    assert torch.equal(tensor, theirs[key]), (kind, name, key)
                else:
                    torch.testing.assert_close(theirs[key], tensor, rtol=1e-5, atol=1e-7,
                                               msg=lambda m, k=(kind, name, key): f"{k}: {m}")
        assert reconstructed(compiled), kind
    assert {kind for kind, _ in compiled._compiled_steps} == {"basis", "coordinate", "observe", "ste"}


@pytest.mark.parametrize("block", [None, 256])
@pytest.mark.parametrize("kind", ["basis", "coordinate", "ste"])
def test_layers_of_one_shape_in_a_bucket_step_as_if_each_had_its_own(monkeypatch, kind, block):
    """Two ``Linear(32, 32)`` share a bucket and their views have the same shapes, so a mix-up of the layers' spans
    would raise nothing. After one step each weight is its own ŵ, and each layer's state is what it is when every
    layer has a bucket of its own (codes and masks exactly; the rest to rounding, the refit being solved in
    another batch)."""
    monkeypatch.setattr(buckets, "BLOCK", {} if block is None else {"cpu": block})
    model, twin = mlp([32, 32, 32]), mlp([32, 32, 32])
    shared, alone = network_of(model), network_of(twin)
    if kind == "ste":
        shared.start_ste()
        alone.start_ste()
    with monkeypatch.context() as patch:
        patch.setattr(network_module, "bind", lambda layers, steps: [buckets.BoundBucket([layer], steps)
                                                                      for layer in layers])
        alone.buckets = []
        alone.bound()
    backward(model)
    backward(twin)
    for network in (shared, alone):
        getattr(network, f"{kind}_step")(network.take_grads(), 1e-2)
    assert [bucket.names() for bucket in shared.buckets] == [["0", "1"]]
    assert [bucket.names() for bucket in alone.buckets] == [["0"], ["1"]]
    for name, module in (("0", model[0]), ("1", model[1])):
        layer = shared.layers[name]
        assert torch.equal(module.weight.detach(), layer.layout.from_groups(layer.state.reconstruct())), name
        for key, tensor in shared.state_tensors()[name].items():
            expected = alone.state_tensors()[name][key]
            if tensor.dtype in (torch.uint8, torch.bool, torch.long):
                assert torch.equal(tensor, expected), (name, key)
            else:
                torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-8,
                                           msg=lambda m, k=(name, key): f"{k}: {m}")
        torch.testing.assert_close(module.weight, twin[int(name)].weight, rtol=1e-5, atol=1e-7)
    assert not torch.equal(model[0].weight, model[1].weight)
