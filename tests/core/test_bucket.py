"""Flat buckets (``core/bucket.py``): the per-layer steps of ``core/steps.py``, group for group, in a fixed number
of ops; masked groups untouched; no host synchronisation."""
import copy
import functools
import itertools

import pytest
import torch

from alq_lightning.core import AmsgradStats, MultiBitState, QuadraticConfig, greedy_init
from alq_lightning.core import steps as dense
from alq_lightning.core.bucket import Bucket, coordinate_step, nearest_patterns, observe, weight_domain_step
from alq_lightning.core.multibit import codebook
from alq_lightning.core.stats import update_stats

CONFIG = QuadraticConfig()
LR = 1e-2
SHAPES = [(5, 7), (3, 16), (8, 3), (1, 1)]  # (groups, group size) of each layer


class Layer:
    """One layer's dense state, statistics, gradient and latent weights, with its step counters."""

    def __init__(self, groups: int, size: int, max_bits: int, seed: int, dtype=torch.float32) -> None:
        gen = torch.Generator().manual_seed(seed)
        weights = torch.randn(groups, size, generator=gen, dtype=dtype)
        self.state = greedy_init(weights, max_bits)
        if groups > 1 and max_bits > 2:  # one group with its top slots pruned (canonical dead form)
            self.state.mask[1, 2:] = False
            self.state.coords[1, 2:] = 0
            self.state.codes[1] |= sum(1 << k for k in range(2, max_bits))
        self.weight_stats = AmsgradStats(*(torch.rand(groups, size, generator=gen, dtype=dtype) * 1e-4
                                           for _ in range(3)))
        self.weight_stats.vmax = torch.maximum(self.weight_stats.vmax, self.weight_stats.v)
        self.coord_stats = AmsgradStats(*(torch.rand(groups, max_bits, generator=gen, dtype=dtype) * 1e-3
                                          for _ in range(3)))
        self.coord_stats.vmax = torch.maximum(self.coord_stats.vmax, self.coord_stats.v)
        self.grad = torch.randn(groups, size, generator=gen, dtype=dtype) * 0.1
        self.latent = weights + 0.01
        self.steps = [3, 4]


def layers(max_bits: int, shapes=SHAPES, dtype=torch.float32) -> list[Layer]:
    return [Layer(g, n, max_bits, seed, dtype) for seed, (g, n) in enumerate(shapes)]


def bucket_of(parts: list[Layer]) -> Bucket:
    """The bucket holding copies of ``parts``' states, in order."""
    def cat(get, weight_level: bool) -> torch.Tensor:
        return torch.cat([get(p).reshape(-1) if weight_level else get(p) for p in parts]).clone()

    counts = torch.tensor([p.state.num_groups for p in parts])
    return Bucket(
        codes=cat(lambda p: p.state.codes, True), coords=cat(lambda p: p.state.coords, False),
        mask=cat(lambda p: p.state.mask, False),
        weight_stats=AmsgradStats(*(cat(lambda p, k=k: getattr(p.weight_stats, k), True) for k in ("m", "v", "vmax"))),
        coord_stats=AmsgradStats(*(cat(lambda p, k=k: getattr(p.coord_stats, k), False) for k in ("m", "v", "vmax"))),
        weight_steps=torch.tensor([p.steps[0] for p in parts]).repeat_interleave(counts),
        coord_steps=torch.tensor([p.steps[1] for p in parts]).repeat_interleave(counts),
        group_sizes=torch.tensor([p.state.group_size for p in parts]).repeat_interleave(counts),
        layers=tuple((p.state.num_groups, p.state.group_size) for p in parts),
        latent=cat(lambda p: p.latent, True),
    )


def dense_step(kind: str, part: Layer) -> None:
    """The documented per-layer step (``core/steps.py``) with the layer's counters."""
    if kind in ("basis", "ste"):
        part.steps[0] += 1
        part.steps[1] = part.steps[0]
        if kind == "basis":
            dense.basis_step(part.state, part.weight_stats, part.coord_stats, part.grad, part.steps[0], LR, CONFIG)
        else:
            dense.ste_step(part.state, part.latent, part.weight_stats, part.coord_stats, part.grad, part.steps[0],
                           LR, CONFIG)
    elif kind == "coordinate":
        part.steps[1] += 1
        dense.coordinate_step(part.state, part.coord_stats, part.grad, part.steps[1], LR, CONFIG)
    else:
        part.steps[1] += 1
        update_stats(part.coord_stats, dense.project_grad(part.state, part.grad), CONFIG)


def bucket_step(kind: str, bucket: Bucket, grad: torch.Tensor, update: torch.Tensor, block) -> None:
    if kind in ("basis", "ste"):
        weight_domain_step(bucket, grad, update, LR, CONFIG, ste=kind == "ste", block=block)
    elif kind == "coordinate":
        coordinate_step(bucket, grad, update, LR, CONFIG, block=block)
    else:
        observe(bucket, grad, update, CONFIG, block=block)


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int) -> None:
    """Equal within ``ulps`` units in the last place of the largest magnitude (sums that cancel have no relative
    precision of their own); ``ulps=0`` is bit-for-bit equality."""
    scale = ulps * torch.finfo(expected.dtype).eps
    torch.testing.assert_close(actual, expected, rtol=scale, atol=scale * float(expected.abs().max()))


def assert_bucket_equals(bucket: Bucket, expected: Bucket, coords_rtol: float = 0.0, sums_ulps: int = 0) -> None:
    """Every tensor bit for bit, except the per-group sums of second moments (summation order), to 1e-6, the
    coordinates to ``coords_rtol`` and the per-group sums of first moments to ``sums_ulps``."""
    for key in ("codes", "mask", "weight_steps", "coord_steps", "latent"):
        assert torch.equal(getattr(bucket, key), getattr(expected, key)), key
    torch.testing.assert_close(bucket.coords, expected.coords, rtol=coords_rtol, atol=0)
    for key in ("m", "v", "vmax"):
        assert torch.equal(getattr(bucket.weight_stats, key), getattr(expected.weight_stats, key)), key
    assert_within_ulps(bucket.coord_stats.m, expected.coord_stats.m, sums_ulps)
    for key in ("v", "vmax"):
        torch.testing.assert_close(getattr(bucket.coord_stats, key), getattr(expected.coord_stats, key),
                                   rtol=1e-6, atol=0)


KINDS = ("basis", "ste", "coordinate", "observe")


@pytest.mark.parametrize(("kind", "max_bits", "block"),
                         list(itertools.product(KINDS, (1, 3, 4), (None, 40, 1))))
def test_a_bucket_step_equals_the_per_layer_steps(kind, max_bits, block):
    """Layers of four group sizes in one bucket, whole (ragged) or in blocks of a layer's rows: the state after a
    step is the one the per-layer steps give (codes, masks, weight statistics, counters, latent bit for bit).
    Blocks solve the refit in other batches than the per-layer steps, which may round coordinates differently."""
    parts = layers(max_bits)
    bucket = bucket_of(parts)
    grad = torch.cat([p.grad.reshape(-1) for p in parts])
    bucket_step(kind, bucket, grad, torch.ones(bucket.num_groups, dtype=torch.bool), block)
    for part in parts:
        dense_step(kind, part)
    assert_bucket_equals(bucket, bucket_of(parts), coords_rtol=0.0 if block is None else 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_groups_outside_update_stay_bit_identical_even_with_non_finite_gradients(kind):
    """Only the layers whose groups are in ``update`` step; the others keep every tensor and counter, though their
    gradient is inf or nan."""
    parts = layers(3)
    bucket = bucket_of(parts)
    stepping = [True, False, True, False]
    update = torch.cat([torch.full((p.state.num_groups,), s) for p, s in zip(parts, stepping)])
    grad = torch.cat([p.grad.reshape(-1) if s else torch.full((p.grad.numel(),), v)
                      for p, s, v in zip(parts, stepping, (0, float("inf"), 0, float("nan")))])
    bucket_step(kind, bucket, grad, update, None)
    for part, step in zip(parts, stepping):
        if step:
            dense_step(kind, part)
    assert_bucket_equals(bucket, bucket_of(parts))


def test_a_skipped_step_changes_nothing():
    """``update`` all False (a non-finite gradient somewhere): every tensor of the bucket is unchanged."""
    for kind in KINDS:
        bucket = bucket_of(layers(4))
        before = copy.deepcopy(bucket)
        bucket_step(kind, bucket, torch.full((bucket.numel,), float("nan")),
                    torch.zeros(bucket.num_groups, dtype=torch.bool), None)
        assert_bucket_equals(bucket, before)


def test_float64_buckets_follow_the_float64_layers():
    parts = layers(3, dtype=torch.float64)
    bucket = bucket_of(parts)
    weight_domain_step(bucket, torch.cat([p.grad.reshape(-1) for p in parts]),
                       torch.ones(bucket.num_groups, dtype=torch.bool), LR, CONFIG)
    for part in parts:
        dense_step("basis", part)
    assert bucket.coords.dtype == torch.float64
    # The bucket solves all groups' refits and sums their first moments in one batched call, the layers one batch
    # each: MKL picks its float64 kernels by batch size and CPU (another path on AMD), so a coordinate or a
    # moment sum may differ in its last bits. Codes, masks and weight statistics stay exact.
    assert_bucket_equals(bucket, bucket_of(parts), coords_rtol=4 * torch.finfo(torch.float64).eps, sums_ulps=4)


def test_nearest_patterns_is_the_brute_force_nearest_with_ties_to_the_smaller_value():
    gen = torch.Generator().manual_seed(1)
    coords = torch.randint(1, 5, (6, 3), generator=gen) / 4  # dyadic values: exact midpoints, so ties happen
    book = codebook(coords)
    sizes = torch.tensor([1, 5, 9, 2, 7, 4])
    group = torch.repeat_interleave(sizes)
    target = torch.randint(-24, 25, (int(sizes.sum()),), generator=gen) / 8
    index = nearest_patterns(book, target, group << 3)
    ties = 0
    for w, (g, t) in enumerate(zip(group.tolist(), target.tolist())):
        values = book[g]
        distance = (values - t).abs()
        nearest = values[distance == distance.min()]
        ties += int(nearest.unique().numel() > 1)
        assert values[index[w]] == nearest.min(), (w, t)
    assert ties > 0


def test_the_codebook_of_a_group_does_not_depend_on_the_other_groups():
    """ŵ is the same bit for bit whether a group's codebook is computed alone, with its layer or in a bucket."""
    gen = torch.Generator().manual_seed(2)
    coords = torch.rand(1000, 6, generator=gen) * torch.logspace(-6, 0, 6)
    mask = torch.rand(1000, 6, generator=gen) > 0.2
    whole = codebook(coords * mask)
    for rows in (slice(0, 1), slice(3, 17), slice(500, 1000)):
        assert torch.equal(codebook(coords[rows] * mask[rows]), whole[rows])
    state = MultiBitState(torch.zeros(1000, 4, dtype=torch.uint8), coords, mask)
    assert torch.equal(state.codebook(), whole)


def dispatched(count, kind: str, shapes):
    """The ATen ops of a second bucket step (``count`` is ``bench/bench_launches.py``'s counter)."""
    bucket = bucket_of(layers(4, shapes))
    grad, update = torch.randn(bucket.numel), torch.ones(bucket.num_groups, dtype=torch.bool)
    bucket_step(kind, bucket, grad, update, None)
    return count(lambda: bucket_step(kind, bucket, grad, update, None))


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_launches_the_same_ops_for_any_number_of_layers_and_never_reads_the_device(kind, bench_module):
    """Two layers or eight of other group sizes: the same ATen ops, none of which reads a value back."""
    count = bench_module("bench_launches").count
    few = dispatched(count, kind, [(4, 9), (2, 64)])
    many = dispatched(count, kind, [(3, 5), (7, 9), (1, 1), (2, 64), (16, 3), (5, 25), (4, 128), (9, 16)])
    assert few.ops == many.ops
    assert few.syncs == 0 and few.total > 0


@pytest.mark.parametrize(("kind", "block"), list(itertools.product(("basis", "ste", "coordinate"), (None, 8))))
def test_each_layer_of_one_shape_gets_its_own_reconstruction(kind, block):
    """Two layers of one shape (their views interchangeable) and a third: the ŵ a step writes to ``out`` is, layer
    by layer, the per-layer step's reconstruction (to the rounding of a refit solved in another batch), and the
    bucket's own :meth:`Bucket.reconstruct` exactly."""
    parts = layers(3, shapes=[(4, 8), (4, 8), (3, 5)])
    bucket = bucket_of(parts)
    grad = torch.cat([p.grad.reshape(-1) for p in parts])
    out = torch.full((bucket.numel,), float("nan"))
    step = coordinate_step if kind == "coordinate" else functools.partial(weight_domain_step, ste=kind == "ste")
    step(bucket, grad, torch.ones(bucket.num_groups, dtype=torch.bool), LR, CONFIG, block=block, out=out)
    for part in parts:
        dense_step(kind, part)
    assert torch.equal(out, bucket.reconstruct(block=block))
    expected = torch.cat([part.state.reconstruct().reshape(-1) for part in parts])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(out[:32], out[32:64])
