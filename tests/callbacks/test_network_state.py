"""``MultiBitNetwork``'s counters and checkpoint state: a fresh network, the scalars and tensors of current and
older checkpoints (and the ones it refuses, leaving its state as it was), steps that touch only the layers they
update, pruning's return value, and the completion check of ``ALQCallback`` against ``target_bits``."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from alq_lightning import ALQCallback
from alq_lightning.core import QuadraticConfig
from alq_lightning.layers import LayerSelection, attach
from alq_lightning.network import MultiBitNetwork

LAYERS = ("0", "2")  # Linear(64, 32): 32 groups of 64; Linear(32, 16): 16 groups of 32


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def network(seed: int = 0, max_bits: int = 3, initialize: bool = True, **kwargs) -> MultiBitNetwork:
    built = MultiBitNetwork(*attach(model(seed), LayerSelection(max_bits=max_bits)), **kwargs)
    if initialize:
        built.initialize()
    return built


def gradients(net: MultiBitNetwork, seed: int = 1, names=LAYERS) -> frozenset[str]:
    """Random ``[G, n]`` gradients of ``names`` put into the network's buckets; the layers that have one."""
    g = torch.Generator().manual_seed(seed)
    return net.load_grads({name: torch.randn(net.layers[name].layout.num_groups, net.layers[name].layout.group_size,
                                             generator=g) for name in names})


def snapshot(net: MultiBitNetwork) -> dict:
    return {"tensors": net.state_tensors(), "weights": {n: q.param.detach().clone() for n, q in net.layers.items()},
            "weight_steps": dict(net.weight_steps), "coord_steps": dict(net.coord_steps),
            "initial_bits": net.initial_bits}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in ("weight_steps", "coord_steps", "initial_bits"):
        assert a[key] == b[key], key
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), name
        for key, tensor in a["tensors"][name].items():
            assert torch.equal(tensor, b["tensors"][name][key]), (name, key)


# A fresh network ------------------------------------------------------------------------------------------

def test_a_new_network_counts_no_steps_and_has_no_initial_average():
    net = network(initialize=False)
    assert net.weight_steps == {"0": 0, "2": 0}
    assert net.coord_steps == {"0": 0, "2": 0}
    assert net.initial_bits == 0.0 and net.scalars() == {"initial_bits": 0.0}
    assert net.without_stats() == ["0", "2"]


def test_the_quadratic_model_uses_the_given_constants_or_the_defaults():
    assert network(initialize=False).config == QuadraticConfig(beta1=0.9, beta2=0.999, eps=1e-8)
    config = QuadraticConfig(beta1=0.5, beta2=0.75, eps=1e-3)
    assert network(initialize=False, config=config).config == config


# Scalars: current and older checkpoints -------------------------------------------------------------------

def test_scalars_of_a_current_checkpoint_leave_the_per_layer_counters_alone():
    net = network()
    net.set_steps({"0": (4, 6), "2": (1, 2)})
    net.load_scalars({"initial_bits": 2.5})
    assert net.initial_bits == 2.5
    assert (net.weight_steps, net.coord_steps) == ({"0": 4, "2": 1}, {"0": 6, "2": 2})


def test_the_single_step_counters_of_an_older_checkpoint_apply_to_every_layer():
    net = network()
    net.set_steps({"0": (4, 6), "2": (1, 2)})
    net.load_scalars({"initial_bits": 2.5, "weight_step": 7, "coord_step": 3})
    assert net.initial_bits == 2.5
    assert net.weight_steps == {"0": 7, "2": 7}
    assert net.coord_steps == {"0": 3, "2": 3}
    assert all(type(v) is int for v in (*net.weight_steps.values(), *net.coord_steps.values()))


# Tensors: round trip, older checkpoints, refusals ---------------------------------------------------------

def trained(seed: int = 0) -> MultiBitNetwork:
    net = network(seed)
    net.basis_step(gradients(net, 1), 1e-3)
    net.coordinate_step(gradients(net, 2, names=("0",)), 1e-3)
    return net


def test_state_tensors_round_trip_with_the_per_layer_counters():
    source = trained()
    assert (source.weight_steps, source.coord_steps) == ({"0": 1, "2": 1}, {"0": 2, "2": 1})
    target = network(seed=5)
    target.load_state_tensors(source.state_tensors())
    assert (target.weight_steps, target.coord_steps) == ({"0": 1, "2": 1}, {"0": 2, "2": 1})
    for name, layer in target.layers.items():
        for key, tensor in source.state_tensors()[name].items():
            if key != "steps":
                assert torch.equal(layer.buffer(key), tensor), (name, key)
        expected = layer.layout.from_groups(layer.state.reconstruct())
        assert torch.equal(layer.param.detach(), expected), name


def test_an_older_checkpoint_without_step_counters_keeps_the_counters():
    tensors = trained().state_tensors()
    for entry in tensors.values():
        del entry["steps"]
    target = network(seed=5)
    target.set_steps({"0": (9, 7), "2": (8, 6)})
    target.load_state_tensors(tensors)
    assert (target.weight_steps, target.coord_steps) == ({"0": 9, "2": 8}, {"0": 7, "2": 6})
    assert torch.equal(target.layers["0"].buffer("coords"), tensors["0"]["coords"])


def test_latent_weights_load_in_both_forms():
    """``latent [G, n]`` during STE is held; ``[0, n]`` means none."""
    source = trained()
    source.start_ste()
    tensors = source.state_tensors()
    tensors["2"]["latent"] = torch.zeros(0, 32)
    target = network(seed=5)
    target.load_state_tensors(tensors)
    assert torch.equal(target.layers["0"].buffer("latent"), tensors["0"]["latent"])
    assert tuple(target.layers["0"].buffer("latent").shape) == (32, 64)
    assert tuple(target.layers["2"].buffer("latent").shape) == (0, 32)


def broken(change: str) -> dict:
    tensors = trained(seed=3).state_tensors()
    if change == "missing layer":
        del tensors["2"]
    elif change == "extra layer":
        tensors["9"] = tensors["2"]
    elif change == "missing tensor":
        del tensors["2"]["coords"]
    elif change == "coords shape":
        tensors["2"]["coords"] = tensors["2"]["coords"][:, :2]
    elif change == "codes shape":
        tensors["2"]["codes"] = tensors["2"]["codes"].T
    elif change == "latent rows":
        tensors["2"]["latent"] = torch.zeros(5, 32)
    return tensors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing layer", "checkpoint has multi-bit layers ['0'], the model has ['0', '2']"),
        ("extra layer", "checkpoint has multi-bit layers ['0', '2', '9'], the model has ['0', '2']"),
        ("missing tensor", "checkpoint tensor 2.coords is None, the model expects (16, 3)"),
        ("coords shape", "checkpoint tensor 2.coords is (16, 2), the model expects (16, 3)"),
        ("codes shape", "checkpoint tensor 2.codes is (32, 16), the model expects (16, 32)"),
        ("latent rows", "checkpoint tensor 2.latent is (5, 32), the model expects (0, 32) or (16, 32)"),
    ],
)
def test_a_mismatching_checkpoint_is_refused_before_anything_is_written(change, message):
    target = trained()
    before = snapshot(target)
    with pytest.raises(ValueError) as error:
        target.load_state_tensors(broken(change))
    assert str(error.value) == message
    assert_same(snapshot(target), before)


# Steps touch only the layers they update --------------------------------------------------------------------

@pytest.mark.parametrize("step", ["basis_step", "coordinate_step", "ste_step", "clear_slots"])
def test_a_step_leaves_the_layers_without_a_gradient_as_they_are(step):
    net = network()
    net.observe(gradients(net))
    if step == "ste_step":
        net.start_ste()
    untouched = net.layers["2"].param
    with torch.no_grad():
        untouched.mul_(0.5)
    held = untouched.detach().clone()
    if step == "clear_slots":
        slots = torch.zeros_like(net.layers["0"].state.mask)
        slots[:, 0] = True
        net.clear_slots({"0": slots})
    else:
        getattr(net, step)(gradients(net, 2, names=("0",)), 1e-3)
    assert torch.equal(untouched.detach(), held)
    stepped = net.layers["0"]
    assert torch.equal(stepped.param.detach(), stepped.layout.from_groups(stepped.state.reconstruct()))


def test_write_weights_of_some_layers_writes_those_only():
    net = network()
    with torch.no_grad():
        for layer in net.layers.values():
            layer.param.zero_()
    net.write_weights(["2"])
    assert not bool(net.layers["0"].param.detach().any())
    layer = net.layers["2"]
    assert torch.equal(layer.param.detach(), layer.layout.from_groups(layer.state.reconstruct()))


# Pruning -------------------------------------------------------------------------------------------------

def test_pruning_after_one_step_of_statistics_returns_the_bits_removed():
    """One observed gradient is enough statistics to rank a layer's slots; the return value is what went."""
    net = network()
    net.observe(gradients(net))
    assert net.coord_steps == {"0": 1, "2": 1}
    before = net.binary_bits
    removed = net.prune_slots(2000, 1e-3)
    assert removed == before - net.binary_bits
    assert 2000 <= removed < 2000 + 64
    slots = torch.zeros_like(net.layers["2"].state.mask)
    slots[:3] = net.layers["2"].state.mask[:3]
    live = int(slots.sum())
    assert net.clear_slots({"2": slots}) == live * 32


def test_pruning_ranks_per_slot_unless_asked_per_bit():
    """``per_bit`` is off by default; on, it ranks by loss increase per bit and picks other slots here."""
    masks = {}
    for per_bit in (None, False, True):
        net = network()
        net.observe(gradients(net))
        if per_bit is None:
            net.prune_slots(2000, 1e-3)
        else:
            net.prune_slots(2000, 1e-3, per_bit=per_bit)
        masks[per_bit] = {name: layer.state.mask.clone() for name, layer in net.layers.items()}
    assert all(torch.equal(masks[None][name], masks[False][name]) for name in LAYERS)
    assert not all(torch.equal(masks[True][name], masks[False][name]) for name in LAYERS)


# The completion check of ALQCallback ----------------------------------------------------------------------

def one_bit_callback(target_bits: float) -> ALQCallback:
    """An ALQCallback set up on ``model()`` whose layers hold exactly one live slot per group (1.0 bits)."""
    alq = ALQCallback(target_bits, max_bits=2, rounds=1, basis_epochs=1, coordinate_epochs=0, ste_epochs=0,
                      final_coordinate_epochs=0)
    alq.init.setup(SimpleNamespace(strategy=object(), callbacks=[]), model(), "fit")
    for layer in alq.network.layers.values():
        layer.state.mask[:] = False
        layer.state.mask[:, 0] = True
    assert alq.network.avg_bits == 1.0
    return alq


@pytest.mark.parametrize("target_bits", [1.0, 1.0 - 1e-9, 1.5])
def test_ending_at_the_target_counts_as_reached(target_bits):
    one_bit_callback(target_bits)._check_target()


@pytest.mark.parametrize(
    ("target_bits", "stepped", "message"),
    [
        (0.5, False, "the ALQ schedule ended at 1.0000 average bits, above target_bits=0.5; layers that never "
                     "received a gradient: ['0', '2']"),
        (0.999999, True, "the ALQ schedule ended at 1.0000 average bits, above target_bits=0.999999; layers that "
                         "never received a gradient: none"),
    ],
)
def test_ending_above_the_target_is_an_error_naming_the_unstepped_layers(target_bits, stepped, message):
    alq = one_bit_callback(target_bits)
    if stepped:
        alq.network.set_steps(dict.fromkeys(alq.network.layers, (1, 1)))
    with pytest.raises(RuntimeError) as error:
        alq._check_target()
    assert str(error.value) == message



# Structures travel beside the tensors -----------------------------------------------------------------------

def square_init(structure: str | None, seed: int = 0):
    """ALQInit set up on a Linear(16, 16) (``structure`` or the default, subchannelwise(1)) and initialised."""
    from alq_lightning import ALQInit

    torch.manual_seed(seed)
    init = ALQInit(max_bits=2, structures=None if structure is None else {"0": structure})
    init.setup(SimpleNamespace(strategy=object(), callbacks=[]), nn.Sequential(nn.Linear(16, 16)), "fit")
    init.network.initialize()
    return init


def test_a_checkpoint_of_another_layout_with_the_same_shapes_is_refused_before_anything_is_written():
    """Columnwise and subchannelwise groups of a square weight have one shape; loading one as the other would
    scramble every weight without an error."""
    checkpoint = {}
    square_init("columnwise(1)").on_save_checkpoint(None, None, checkpoint)
    assert checkpoint["alq_structures"] == {"0": "columnwise(1)"}
    target = square_init(None, seed=1)
    before = target.network.state_tensors()
    with pytest.raises(ValueError, match=r"checkpoint layer '0' was quantized as columnwise\(1\), the model's is "
                                         r"subchannelwise\(1\): its groups would be read in another order"):
        target.on_load_checkpoint(None, None, checkpoint)
    after = target.network.state_tensors()
    assert all(torch.equal(t, after["0"][key]) for key, t in before["0"].items())
    again = square_init("columnwise(1)", seed=2)
    again.on_load_checkpoint(None, None, checkpoint)
    assert torch.equal(again.network.layers["0"].buffer("codes"), checkpoint["alq"]["0"]["codes"])
