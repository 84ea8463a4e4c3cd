"""Fault injection: setups that could defeat ALQ either end at the target with ŵ in every quantized weight,
or stop with an error that names the culprit. Never a run that "completes" without doing what it says."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from alq_lightning import ActivationQuantization, ALQCallback, ALQInit, BasisRefit, CoordinateRefit, bit_summary
from alq_lightning.network import MultiBitNetwork

from tiny import TinyModule, build, loader, mlp, trainer

TARGET = 0.8


def short(target_bits: float = TARGET, **kwargs) -> ALQCallback:
    options = dict(max_bits=3, rounds=1, basis_epochs=1, coordinate_epochs=1, ste_epochs=1, final_coordinate_epochs=1)
    options.update(kwargs)
    return ALQCallback(target_bits, **options)


def fit(module: L.LightningModule, alq: ALQCallback, kind: str = "image", **kwargs) -> L.Trainer:
    run = trainer([alq], alq.total_epochs, **kwargs)
    run.fit(module, loader(kind))
    return run


def assert_quantized(alq: ALQCallback, target_bits: float = TARGET, unstepped: tuple[str, ...] = ()) -> None:
    """The target is met and every quantized weight is its reconstruction, in the weight's own dtype; every
    layer but ``unstepped`` was stepped."""
    network = alq.network
    assert network.avg_bits <= target_bits
    for name, layer in network.layers.items():
        weight = layer.param.detach()
        expected = layer.layout.from_groups(layer.state.reconstruct()).to(weight.dtype)
        assert torch.equal(weight, expected), name
        assert bool((layer.state.coords >= 0).all()), name
        assert (network.weight_steps[name] > 0) != (name in unstepped), name


class TwoHeads(nn.Module):
    """``fc_unused`` is registered but not used when ``use_extra`` is False."""

    def __init__(self, unused_width: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 4)
        self.fc_unused = nn.Linear(unused_width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x.flatten(1)).relu())


# 1. Layers without a gradient ------------------------------------------------------------------------------

def test_frozen_weight_stays_in_float_and_the_rest_reaches_the_target():
    module = build("mlp")
    module.net[1].weight.requires_grad_(False)
    frozen = module.net[1].weight.detach().clone()
    alq = short()
    fit(module, alq)
    assert "net.1" not in alq.network.layers
    assert "frozen" in alq.network.float_layers["net.1"]
    assert torch.equal(module.net[1].weight, frozen)
    assert_quantized(alq)


def test_frozen_weight_named_in_include_is_refused_when_it_never_gets_a_gradient():
    module = build("mlp")
    module.net[1].weight.requires_grad_(False)
    alq = short(include=["net.1", "net.3"])
    with pytest.raises(ValueError, match=r"\['net.1'\].*requires_grad=False"):
        fit(module, alq)


def test_unused_layer_is_reported_and_the_used_layers_are_still_stepped_and_pruned():
    module = TinyModule(TwoHeads(unused_width=8))
    alq = short()
    with pytest.warns(UserWarning, match=r"\['net.fc_unused'\] have not received a gradient"):
        fit(module, alq)
    assert alq.network.weight_steps["net.fc_unused"] == 0
    assert alq.network.without_stats() == ["net.fc_unused"]
    assert_quantized(alq, unstepped=("net.fc_unused",))


def test_a_target_that_only_the_layers_without_gradient_block_raises_with_their_names():
    module = TinyModule(TwoHeads(unused_width=512))
    alq = short(target_bits=0.5)
    with pytest.raises(RuntimeError, match=r"cannot reach .*\['net.fc_unused'\]"):
        fit(module, alq)


class TwoOptimizers(TinyModule):
    """Manual optimization: one loss and optimizer per layer, each loss reaching only its own layer's weight
    (the other layer is detached)."""

    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        first, second = self.optimizers()
        hidden = self.net[2](self.net[1](self.net[0](x)))
        loss = nn.functional.cross_entropy(nn.functional.linear(hidden, self.net[3].weight.detach(),
                                                                self.net[3].bias), y)
        first.zero_grad()
        self.manual_backward(loss)
        first.step()
        hidden = hidden.detach()
        loss = nn.functional.cross_entropy(self.net[3](hidden), y)
        second.zero_grad()
        self.manual_backward(loss)
        second.step()

    def configure_optimizers(self):
        return (torch.optim.Adam(self.net[1].parameters(), lr=1e-3),
                torch.optim.Adam(self.net[3].parameters(), lr=1e-3))


def test_two_optimizers_whose_losses_reach_different_layers_step_every_layer():
    torch.manual_seed(0)
    alq = short()
    fit(TwoOptimizers(), alq)
    assert alq.network.without_stats() == []
    assert_quantized(alq)


def test_a_network_steps_the_layers_with_a_gradient_and_counts_per_layer():
    module = build("mlp")
    alq = short()
    fit(module, alq)
    network = alq.network
    before = {name: layer.state.coords.clone() for name, layer in network.layers.items()}
    steps = dict(network.coord_steps)
    grad = torch.ones_like(module.net[3].weight)
    module.net[3].weight.grad = grad
    grads = network.take_grads()
    assert list(grads) == ["net.3"]
    network.coordinate_step(grads, lr=1e-2)
    assert network.coord_steps == {**steps, "net.3": steps["net.3"] + 1}
    assert torch.equal(network.layers["net.1"].state.coords, before["net.1"])
    assert not torch.equal(network.layers["net.3"].state.coords, before["net.3"])


# 2. Shared weights -----------------------------------------------------------------------------------------

class SharedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32, bias=False)
        self.b = nn.Linear(32, 32)
        self.b.weight = self.a.weight
        self.inp = nn.Linear(64, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1)).relu()
        return self.head(self.b(self.a(h).relu()).relu())


def test_a_parameter_shared_by_two_modules_is_quantized_once_and_both_modules_use_it():
    torch.manual_seed(0)
    module = TinyModule(SharedWeight())
    alq = short()
    fit(module, alq)
    assert sorted(alq.network.layers) == ["net.a", "net.head", "net.inp"]
    assert "shares its weight with 'net.a'" in alq.network.float_layers["net.b"]
    real = sum(p.numel() for name, p in module.named_parameters() if p.dim() > 1)
    assert bit_summary(module).numel == alq.network.numel == real == 64 * 32 + 32 * 32 + 32 * 4
    assert module.net.b.weight is module.net.a.weight
    assert_quantized(alq)


def test_selecting_only_one_user_of_a_shared_parameter_is_refused():
    module = TinyModule(SharedWeight())
    with pytest.raises(ValueError, match=r"'net.a' and 'net.b' share one weight Parameter, but 'net.b' is matched by"):
        fit(module, short(exclude=["net.b"]))


class TiedEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 16)
        self.head = nn.Linear(16, 8)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).mean(dim=1))[:, :4]


def test_tied_embedding_and_output_weights_are_quantized_once():
    torch.manual_seed(0)
    module = TinyModule(TiedEmbedding())
    alq = short()
    fit(module, alq, kind="tokens")
    assert list(alq.network.layers) == ["net.embed"]
    assert alq.network.float_layers == {"net.head": "shares its weight with 'net.embed', quantized there"}
    assert torch.equal(module.net.embed.weight, module.net.head.weight)
    assert_quantized(alq)


# 3. Precision ---------------------------------------------------------------------------------------------

class HalfSafeAdam(TinyModule):
    """Adam's default ``eps=1e-8`` is 0 in float16 and turns the float parameters into NaN; 1e-4 is not."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, eps=1e-4)


@pytest.mark.parametrize(("precision", "weight_dtype", "state_dtype"), [
    ("bf16-true", torch.bfloat16, torch.float32),
    ("16-true", torch.float16, torch.float32),
    ("bf16-mixed", torch.float32, torch.float32),
    ("64-true", torch.float64, torch.float32),
    ("float64 model", torch.float64, torch.float64),
])
def test_every_precision_keeps_float_state_and_writes_the_reconstruction_in_the_weight_dtype(
        recwarn, precision, weight_dtype, state_dtype):
    """The state's dtype is fixed when ALQ attaches (float64 only for a model already in float64), and no
    step is lost to a non-finite gradient."""
    module = HalfSafeAdam(build("mlp").net)
    if precision == "float64 model":
        module, precision = module.double(), "64-true"
    alq = short()
    fit(module, alq, precision=precision)
    for layer in alq.network.layers.values():
        assert layer.param.dtype == weight_dtype
        assert all(layer.buffer(key).dtype == state_dtype for key in ("coords", "weight_v", "coord_vmax", "latent"))
    assert not [w for w in recwarn if "not finite" in str(w.message)]
    assert_quantized(alq)


# 4. Gradient clipping -------------------------------------------------------------------------------------

class OwnClipping(TinyModule):
    """Clips by value in its own ``configure_gradient_clipping``, with no clip value on the Trainer."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=1e-6, gradient_clip_algorithm="value")


@pytest.mark.parametrize("algorithm", ["norm", "value", "module hook"])
def test_the_trainers_gradient_clipping_bounds_what_alq_consumes(monkeypatch, algorithm):
    """The Trainer's clipping, or the module's own ``configure_gradient_clipping``, bounds every gradient ALQ
    consumes."""
    clip = 1e-6
    consumed = []
    take = MultiBitNetwork.take_grads

    def recording(network):
        names = take(network)
        consumed.append({name: grad.clone() for bucket in network.buckets
                         for name, grad in bucket.grad_groups().items() if name in names})
        return names

    monkeypatch.setattr(MultiBitNetwork, "take_grads", recording)
    alq = short()
    if algorithm == "module hook":
        algorithm = "value"
        fit(OwnClipping(build("mlp").net), alq)
    else:
        fit(build("mlp"), alq, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    assert len(consumed) == 40 and all(consumed)
    for grads in consumed:
        flat = torch.cat([grad.reshape(-1) for grad in grads.values()])
        if algorithm == "norm":
            assert float(flat.norm()) <= clip * (1 + 1e-4)
        else:
            assert float(flat.abs().max()) <= clip
    assert_quantized(alq)


# 5. One callback, two models ------------------------------------------------------------------------------

def test_reusing_one_callback_on_a_second_model_quantizes_the_second_model():
    alq = short()
    first = build("mlp", seed=0)
    fit(first, alq)
    first_weights = {name: p.detach().clone() for name, p in first.named_parameters()}
    second = build("mlp", seed=1)
    fit(second, alq)
    assert alq.network.belongs_to(second)
    assert_quantized(alq)
    assert all(torch.equal(p, first_weights[name]) for name, p in first.named_parameters())


# Setups that already work keep working ---------------------------------------------------------------------

class NoBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 4, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ManualOptimization(TinyModule):
    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(batch[0]), batch[1]))
        optimizer.step()


class NaNLossAt(TinyModule):
    """The loss is NaN at step 5: ALQ skips that step's update; the float parameters' optimizer (Adam) does not."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 5 else loss


@pytest.mark.parametrize("case", ["bias_free", "manual", "accumulate", "nan_loss"])
def test_setups_that_work_reach_the_target(case):
    torch.manual_seed(0)
    module = {"bias_free": lambda: TinyModule(NoBias()), "manual": ManualOptimization,
              "accumulate": lambda: build("mlp"), "nan_loss": lambda: NaNLossAt(NoBias())}[case]()
    alq = short()
    kwargs = {"accumulate_grad_batches": 2} if case == "accumulate" else {}
    if case == "nan_loss":
        with pytest.warns(UserWarning, match="not finite"):
            fit(module, alq, **kwargs)
    else:
        fit(module, alq, **kwargs)
    assert_quantized(alq)


def test_a_nan_loss_that_reaches_float_parameters_stops_the_fit_naming_the_first():
    """Adam turns the biases NaN at step 5; ALQ would skip every later update and "complete" at the target with a
    NaN model. The epoch end that counts the skipped updates stops the fit instead."""
    torch.manual_seed(0)
    alq = short()
    with pytest.warns(UserWarning, match="skipped 3 ALQ update"), pytest.raises(RuntimeError) as error:
        fit(NaNLossAt(build("mlp").net), alq)
    assert str(error.value) == (
        "parameter 'net.1.bias' is not finite at epoch 0, step 8, after 3 ALQ update(s) of this epoch were skipped "
        "for a non-finite gradient (every later one would be): a non-finite loss or update has reached the model; "
        "lower the learning rate, clip gradients, or find where the loss stops being finite")


class SpareScale(TinyModule):
    """Holds a float parameter outside the loss (no gradient, so no ALQ update is skipped for it)."""

    def __init__(self) -> None:
        super().__init__(build("mlp").net)
        self.spare = nn.Parameter(torch.ones(3))


class BreakSpare(L.Callback):
    """Makes ``spare`` NaN as the last epoch starts, as a broken update would."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 4:
            pl_module.spare.data[1] = float("nan")


def test_a_schedule_ending_on_a_parameter_that_is_not_finite_is_not_reported_complete(caplog):
    alq = short()
    assert alq.total_epochs == 5
    with caplog.at_level("INFO"), pytest.raises(RuntimeError) as error:
        trainer([alq, BreakSpare()], 5).fit(SpareScale(), loader())
    assert str(error.value) == (
        "parameter 'spare' is not finite at epoch 4, step 40, at the end of the ALQ schedule, which a model that is "
        "not finite does not complete: a non-finite loss or update has reached the model; lower the learning rate, "
        "clip gradients, or find where the loss stops being finite")
    assert "ALQ schedule complete" not in caplog.text


# 6. The target is a contract; stages used alone -----------------------------------------------------------

class NoStepWhilePruning(ManualOptimization):
    """Manual optimization that never calls ``optimizer.step()`` in epoch 2 (the pruning window of ``short()``),
    so ALQ's pruning never runs."""

    def training_step(self, batch, batch_idx):
        if self.current_epoch != 2:
            return super().training_step(batch, batch_idx)
        self.manual_backward(nn.functional.cross_entropy(self(batch[0]), batch[1]))


def test_a_schedule_that_ends_above_the_target_raises_instead_of_reporting_completion():
    torch.manual_seed(0)
    alq = short(rounds=1, pruning_epochs=1)
    with pytest.raises(RuntimeError, match=r"ended at 3\.0000 average bits, above target_bits=0\.8"):
        fit(NoStepWhilePruning(), alq)


def test_stages_used_alone_share_one_alq_init():
    """``ALQInit`` with two standalone stages: each stage finds the one ``ALQInit``, and both act in their
    windows."""
    init, basis, coordinate = ALQInit(max_bits=2), BasisRefit(0, 1), CoordinateRefit(1, 1)
    trainer([init, basis, coordinate], 2).fit(build("mlp"), loader())
    assert basis.init is coordinate.init is init
    assert set(init.network.weight_steps.values()) == {8} and set(init.network.coord_steps.values()) == {16}


# 7. Callbacks that would attach twice -----------------------------------------------------------------------

SHORT = "ALQCallback{'target_bits': 0.8, 'total_epochs': 5}"
STATE = "Trainer(callbacks=...) holds 2 callbacks that each attach ALQ's multi-bit state to the model: {}; keep one " \
        "(ALQCallback brings its own ALQInit; stages used alone share one ALQInit)"
INPUTS = "Trainer(callbacks=...) holds 2 callbacks that each attach input quantizers to the model: {}; keep one " \
         "(ALQCallback(act_bits=...) brings its own ActivationQuantization)"
BESIDE = f"BasisRefit would step the layers of {SHORT} beside that callback's own stages: use stages with one " \
         f"ALQInit, or ALQCallback alone"
TWICE = {
    "two ALQCallbacks": (lambda: [short(), short(0.5)], STATE.format(
        f"{SHORT} and ALQCallback{{'target_bits': 0.5, 'total_epochs': 5}}")),
    "ALQInit, then ALQCallback": (lambda: [ALQInit(), short()], STATE.format(f"ALQInit{{'max_bits': 6}} and {SHORT}")),
    "ALQCallback, then ALQInit": (lambda: [short(), ALQInit()], STATE.format(f"{SHORT} and ALQInit{{'max_bits': 6}}")),
    "two ALQInits": (lambda: [ALQInit(2), ALQInit(3), BasisRefit(0, 1)],
                     STATE.format("ALQInit{'max_bits': 2} and ALQInit{'max_bits': 3}")),
    "stage, then two ALQInits": (lambda: [BasisRefit(0, 1), ALQInit(2), ALQInit(3)],
                                 "BasisRefit needs exactly one ALQInit (or ALQCallback) in Trainer(callbacks=...), "
                                 "found 2: ALQInit{'max_bits': 2} and ALQInit{'max_bits': 3}"),
    "input quantizers twice": (lambda: [short(act_bits=2), ActivationQuantization(3)], INPUTS.format(
        "ALQCallback{'target_bits': 0.8, 'total_epochs': 5, 'act_bits': 2} and "
        "ActivationQuantization{'act_bits': 3, 'start_epoch': 0}")),
    "stage, then ALQCallback": (lambda: [BasisRefit(0, 1), short()], BESIDE),
    "ALQCallback, then stage": (lambda: [short(), BasisRefit(0, 1)], BESIDE),
}


@pytest.mark.parametrize("callbacks,message", TWICE.values(), ids=TWICE)
def test_callbacks_that_would_attach_twice_are_refused_before_the_model_changes(callbacks, message):
    """Each callback alone would attach its own multi-bit state (or input quantizers, or step the layers beside
    the pipeline's own stages): refused at setup, naming both, before either touches the model (two
    ALQCallbacks used to end in ``torch.cat(): expected a non-empty list of Tensors`` at 2.5 bits)."""
    module = build("mlp")
    before = {key: value.clone() for key, value in module.state_dict().items()}
    with pytest.raises(ValueError) as error:
        trainer(callbacks(), 5).fit(module, loader())
    assert str(error.value) == message
    assert list(module.named_buffers()) == []
    assert all(torch.equal(value, before[key]) for key, value in module.state_dict().items())
    assert not any(getattr(m, "_alq_act_handles", ()) for m in module.modules())


# 8. Weights without values ----------------------------------------------------------------------------------

def on_meta() -> nn.Module:
    with torch.device("meta"):
        return mlp()


class MaterialisedInPlace(TinyModule):
    """Built on the meta device and materialised in place in ``configure_model`` (Lightning's pattern for models
    too big to build twice); with ``rebuild``, ``configure_model`` builds new modules instead."""

    def __init__(self, rebuild: bool = False) -> None:
        super().__init__(on_meta())
        self.rebuild = rebuild

    def configure_model(self) -> None:
        torch.manual_seed(0)
        if self.rebuild:
            self.net = mlp()
            return
        self.net.to_empty(device="cpu")
        for module in self.net.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()


def test_weights_on_the_meta_device_are_named_at_setup():
    """torch's "Cannot copy out of meta tensor" came from Lightning moving the attached model. ALQ now refuses at
    setup, naming the tensors and when it needs values; Lightning's teardown, moving the model to the CPU, still
    raises torch's error over it, with ALQ's as the error it was handling."""
    alq = short()
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor") as error:
        trainer([alq], alq.total_epochs).fit(TinyModule(on_meta()), loader())
    assert isinstance(error.value.__context__, ValueError)
    assert str(error.value.__context__) == (
        "TinyModule has 4 parameters or buffers on the meta device, without values: net.1.weight, net.1.bias, "
        "net.3.weight, net.3.bias. ALQ initialises from the weights at the start of the fit, after "
        "LightningModule.configure_model: materialise them before Trainer.fit, or in place in configure_model "
        "(to_empty(device=...), then initialise them)")
    assert alq.network is None


def test_weights_materialised_in_place_by_configure_model_are_quantized():
    """The multi-bit buffers attached on the meta device are materialised with the weights and written from them
    at the start of the fit: the run reaches the target as a model built on the CPU does."""
    alq = short()
    module = MaterialisedInPlace()
    fit(module, alq)
    assert_quantized(alq)
    assert all(not tensor.is_meta and bool(tensor.isfinite().all()) for tensor in module.state_dict().values())


def test_layers_replaced_by_configure_model_are_refused_at_the_start_of_the_fit():
    alq = short()
    with pytest.raises(ValueError) as error:
        fit(MaterialisedInPlace(rebuild=True), alq)
    assert str(error.value) == (
        "the layers ALQ attached to in setup (net.1, net.3) are no longer modules of MaterialisedInPlace: "
        "LightningModule.configure_model replaced them. Materialise weights built on the meta device in place there "
        "(to_empty(device=...), then initialise them), or build the model before Trainer.fit")
