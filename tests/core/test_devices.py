"""Device contract of the core: every result stays on its inputs' device and no step reads data back to the host.

The ``meta`` device holds shapes but no data, so any ``.item()``/``int()`` inside a step fails there, and a
function mode rejects any operation that mixes devices (as CUDA does, CPU scalars excepted): a helper tensor
made on the default device instead of the inputs' device is caught on a CPU-only machine too.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from alq_lightning.core import (
    AmsgradStats,
    MultiBitState,
    QuadraticConfig,
    all_patterns,
    basis_step,
    coordinate_step,
    count_below,
    fit_bases,
    flip_negative,
    greedy_init,
    group_importance,
    nearest_patterns,
    pattern_sums,
    project_grad,
    quadratic_model,
    refit_coords,
    slot_bits,
    slot_importance,
    ste_step,
)

META = torch.device("meta")
G, N, K = 6, 5, 3


def tensors(value):
    """Every tensor in nested lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)


class SameDevice(TorchFunctionMode):
    """Refuses any torch call whose non-scalar tensor arguments sit on more than one device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in tensors((args, kwargs)) if t.dim() > 0}
        if len(devices) > 1:
            raise RuntimeError(f"{getattr(func, '__name__', func)} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def test_the_guard_catches_a_mixed_device_call():
    with SameDevice(), pytest.raises(RuntimeError, match="mixes devices"):
        torch.arange(3) + torch.ones(3, device=META)


def on_meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


@pytest.mark.parametrize("block", [1 << 20, 2 * N])
def test_init_and_steps_stay_on_a_data_free_device(block):
    """Greedy init, reconstruction and the three steps run on ``meta`` (so they never read data back) and keep
    codes uint8, coordinates in the compute dtype and masks bool on that device."""
    config = QuadraticConfig()
    with SameDevice():
        state = greedy_init(on_meta(G, N), K, block=block)
        assert (state.codes.dtype, state.coords.dtype, state.mask.dtype) == (torch.uint8, torch.float32, torch.bool)
        rebuilt = state.reconstruct(block=block)
        results = [state.codes, state.coords, state.mask, rebuilt, state.codebook(), state.bases]
        weight_stats, coord_stats = AmsgradStats.zeros_like(rebuilt), AmsgradStats.zeros_like(state.coords)
        coordinate_step(state, coord_stats, on_meta(G, N), 1, 1e-2, config)
        basis_step(state, weight_stats, coord_stats, on_meta(G, N), 1, 1e-2, config, block=block)
        latent = rebuilt.clone()
        ste_step(state, latent, weight_stats, coord_stats, on_meta(G, N), 2, 1e-2, config, block=block)
        p, h = quadratic_model(coord_stats, 2, 1e-2, config)
        results += [latent, p, h, slot_importance(state, p, h), group_importance(state, p, h)]
        results += [*vars(weight_stats).values(), *vars(coord_stats).values()]
    assert all(t.device == META for t in results)
    assert state.bases.dtype == torch.int8 and state.codes.dtype == torch.uint8


def test_helpers_stay_on_a_data_free_device():
    """Each building block returns its documented dtype on the inputs' device."""
    coords, mask = on_meta(G, K), on_meta(G, K, dtype=torch.bool)
    codes = on_meta(G, N, dtype=torch.uint8)
    state = MultiBitState(codes, coords, mask)
    with SameDevice():
        flip_negative(state, on_meta(G, K))
        results = {
            "patterns": (all_patterns(K, torch.float64, META), torch.float64),
            "slot_bits": (slot_bits(mask), torch.int64),
            "pattern_sums": (pattern_sums(codes, on_meta(G, N), K), torch.float32),
            "from_bases": (MultiBitState.from_bases(on_meta(G, K, N), coords, mask).codes, torch.uint8),
            "refit": (refit_coords(codes, mask, on_meta(G, N), on_meta(G, N)), torch.float32),
            "count_below": (count_below(on_meta(G, 7), on_meta(G, N)), torch.int64),
            "count_below_one": (count_below(on_meta(G, 1), on_meta(G, N)), torch.int64),
            "nearest": (nearest_patterns(coords, on_meta(G, N)), torch.int64),
            "project": (project_grad(state, on_meta(G, N)), torch.float32),
        }
        fit_bases(state, on_meta(G, N, dtype=torch.float64), on_meta(G, N, dtype=torch.float64))
    for name, (tensor, dtype) in results.items():
        assert (tensor.device, tensor.dtype) == (META, dtype), name
    assert state.codes.device == META and state.codes.dtype == torch.uint8


@pytest.mark.parametrize("block", [None, 3 * N])
def test_bucket_steps_stay_on_a_data_free_device(block):
    """The flat bucket steps (``core/bucket.py``) and their reconstruction run on ``meta``: they never read data
    back, never mix devices, and keep the state's dtypes."""
    from alq_lightning.core.bucket import Bucket, coordinate_step, observe, weight_domain_step

    config, sizes = QuadraticConfig(), torch.tensor([N, N, 2, 2, 2, 1], device=META)
    groups, weights = 6, 2 * N + 7
    bucket = Bucket(
        codes=on_meta(weights, dtype=torch.uint8), coords=on_meta(groups, K), mask=on_meta(groups, K, dtype=torch.bool),
        weight_stats=AmsgradStats(*(on_meta(weights) for _ in range(3))),
        coord_stats=AmsgradStats(*(on_meta(groups, K) for _ in range(3))),
        weight_steps=on_meta(groups, dtype=torch.long), coord_steps=on_meta(groups, dtype=torch.long),
        group_sizes=sizes, layers=((2, N), (3, 2), (1, 1)), latent=on_meta(weights))
    update = on_meta(groups, dtype=torch.bool)
    with SameDevice():
        for ste in (False, True):
            weight_domain_step(bucket, on_meta(weights), update, 1e-2, config, ste=ste, block=block)
        coordinate_step(bucket, on_meta(weights), update, 1e-2, config, block=block)
        observe(bucket, on_meta(weights), update, config, block=block)
        rebuilt = bucket.reconstruct(block=block)
    assert rebuilt.device == META and rebuilt.dtype == torch.float32 and rebuilt.shape == (weights,)
    assert (bucket.codes.dtype, bucket.coords.dtype, bucket.weight_steps.dtype) == (torch.uint8, torch.float32,
                                                                                    torch.int64)


def test_budget_selection_makes_its_helpers_on_the_inputs_device():
    """``select_budget`` reads its count back (``int``), so it cannot run on ``meta``; instead its inputs stay on the
    CPU while the default device is ``meta``: a helper tensor made without the inputs' device lands there and mixes
    devices, as one made on the CPU would beside CUDA inputs."""
    from alq_lightning.core.prune import select_budget

    scores = torch.tensor([3.0, 1.0, 2.0, torch.inf, 0.5], dtype=torch.float64)
    bits = torch.tensor([2.0, 2.0, 2.0, 2.0, 4.0], dtype=torch.float64)
    with torch.device(META), SameDevice():
        chosen = select_budget(scores, bits, 5.0)
    assert chosen.device.type == "cpu" and chosen.tolist() == [False, True, False, False, True]
