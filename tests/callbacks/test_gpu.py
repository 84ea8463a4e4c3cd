"""On a CUDA device: the bucket steps equal the CPU's, never synchronise with the host, and the compiled (CUDA graph)
step equals the eager one; a Lightning fit runs every stage on the GPU. Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from alq_lightning import ALQCallback
from alq_lightning.layers import LayerSelection, attach
from alq_lightning.network import MultiBitNetwork

from tiny import build, loader, trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")
KINDS = ("basis", "coordinate", "observe", "ste")


def cnn(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 10)).to(device)


def network_of(model: nn.Module, compile: bool = False) -> MultiBitNetwork:
    network = MultiBitNetwork(*attach(model, LayerSelection(max_bits=4, max_bits_overrides={"5": 3})), compile=compile)
    network.initialize()
    return network


def backward(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    model.zero_grad()
    x, y = torch.randn(32, 3, 8, 8, generator=gen).to(device), torch.randint(10, (32,), generator=gen).to(device)
    nn.functional.cross_entropy(model(x), y).backward()


def step(network: MultiBitNetwork, kind: str, lr: float = 1e-2) -> None:
    names = network.take_grads()
    if kind == "observe":
        network.observe(names)
    else:
        getattr(network, f"{kind}_step")(names, lr)


def assert_close_states(got: MultiBitNetwork, want: MultiBitNetwork, rtol: float) -> None:
    for (name, mine), theirs in zip(got.state_tensors().items(), want.state_tensors().values()):
        for key, tensor in mine.items():
            if tensor.dtype in (torch.uint8, torch.bool, torch.long):
                assert (tensor != theirs[key]).float().mean() <= 1e-3, (name, key)
            else:
                torch.testing.assert_close(tensor, theirs[key], rtol=rtol, atol=1e-7, msg=f"{name} {key}")


def test_a_gpu_step_equals_the_cpu_step_to_float_rounding():
    """Same model and batch on both devices, two layers' buckets: every kind of step agrees (CUDA sums in another
    order, so bases may differ at a rare tie)."""
    cpu_model, gpu_model = cnn(torch.device("cpu")), cnn(CUDA)
    cpu, gpu = network_of(cpu_model), network_of(gpu_model)
    for seed, kind in enumerate(KINDS):
        if kind == "ste":
            cpu.start_ste()
            gpu.start_ste()
        for model in (cpu_model, gpu_model):
            backward(model, seed)
        step(cpu, kind)
        step(gpu, kind)
        assert_close_states(gpu, cpu, rtol=1e-4)
        gpu.load_state_tensors(cpu.state_tensors())
    assert len(gpu.buckets) == 2


def test_a_gpu_step_never_waits_for_the_device():
    """With CUDA's sync debug mode set to error, gathering gradients, every kind of step and writing ŵ run without
    one host synchronisation (after a first step that binds the buckets)."""
    model = cnn(CUDA)
    network = network_of(model)
    for kind in KINDS:
        if kind == "ste":
            network.start_ste()
        backward(model, 0)
        step(network, kind)
        backward(model, 1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(network, kind)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert network.skipped == 0


def test_the_compiled_gpu_step_replays_the_eager_step():
    """``compile=True`` on CUDA (a CUDA graph per bucket and kind): several steps at changing learning rates follow
    the eager steps to float rounding, and the weights hold ŵ."""
    eager_model, compiled_model = cnn(CUDA), cnn(CUDA)
    eager, compiled = network_of(eager_model), network_of(compiled_model, compile=True)
    for kind in ("basis", "coordinate", "ste"):
        if kind == "ste":
            eager.start_ste()
            compiled.start_ste()
        for index in range(4):
            for model in (eager_model, compiled_model):
                backward(model, 10 * index)
            lr = 1e-2 * 0.5**index
            step(eager, kind, lr)
            step(compiled, kind, lr)
            assert_close_states(compiled, eager, rtol=1e-4)
            compiled.load_state_tensors(eager.state_tensors())
    for layer in compiled.layers.values():
        assert torch.equal(layer.param.detach(), layer.layout.from_groups(layer.state.reconstruct()))


@pytest.mark.parametrize("compile", [False, True])
def test_a_lightning_fit_on_the_gpu_runs_every_stage(compile):
    alq = ALQCallback(0.8, max_bits=3, rounds=1, basis_epochs=1, coordinate_epochs=1, ste_epochs=1,
                      final_coordinate_epochs=1, compile=compile)
    trainer([alq], alq.total_epochs, accelerator="gpu").fit(build("cnn"), loader(n=64, batch_size=16))
    assert alq.network.avg_bits <= 0.8
    for layer in alq.network.layers.values():
        assert layer.param.is_cuda
        assert torch.equal(layer.param.detach(), layer.layout.from_groups(layer.state.reconstruct()))
