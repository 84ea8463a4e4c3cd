"""Multi-bit activations against brute force: levels, nearest-level search, least-squares refit, the alternating
fit, and the straight-through gradient."""
from __future__ import annotations

import itertools

import pytest
import torch

from alq_lightning.core.activations import (
    fit_levels,
    levels,
    nearest_levels,
    quantization_error,
    quantize_activations,
    refit_levels,
    uniform_levels,
)

CASES = [(bits, signed) for bits in (1, 2, 3, 4) for signed in (True, False)]


def codes_of(bits: int, signed: bool) -> list[list[float]]:
    """Every code's ``e`` written out: entry ``j`` of code ``i`` is bit ``j`` of ``i`` as ±1 or 0/1."""
    off = -1.0 if signed else 0.0
    return [[1.0 if (i >> j) & 1 else off for j in range(bits)] for i in range(2**bits)]


def brute_force_nearest(values: list[float], value: float) -> float:
    return min(values, key=lambda level: (abs(level - value), level))


def data(signed: bool, channels: int = 3, n: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(channels, n, generator=g, dtype=torch.float64) * torch.tensor([[0.5], [1.0], [3.0]][:channels],
                                                                                   dtype=torch.float64)
    return x if signed else x.relu()


@pytest.mark.parametrize(("bits", "signed"), CASES)
def test_levels_are_the_coordinates_times_every_code(bits, signed):
    coords = torch.rand(3, bits, dtype=torch.float64)
    expected = torch.tensor([[sum(g * e for g, e in zip(row, code)) for code in codes_of(bits, signed)]
                             for row in coords.tolist()], dtype=torch.float64)
    assert torch.allclose(levels(coords, signed), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("bits", "signed"), CASES)
def test_nearest_levels_equal_brute_force_with_ties_to_the_lower_level(bits, signed):
    g = torch.Generator().manual_seed(bits)
    coords = torch.randint(1, 16, (3, bits), generator=g).double() / 8  # dyadic: levels and midpoints exact
    x = data(signed) * 2
    table = levels(coords, signed)
    ordered = table.sort(dim=1).values
    x[:, :2] = table[:, :2]  # exact levels
    x[:, 2] = (ordered[:, 1] + ordered[:, 0]) / 2  # a midpoint: the lower of the two wins
    codes = nearest_levels(coords, x, signed)
    for c in range(3):
        for i, value in enumerate(x[c].tolist()):
            assert table[c, codes[c, i]].item() == brute_force_nearest(table[c].tolist(), value), (c, i)


@pytest.mark.parametrize(("bits", "signed"), CASES)
def test_refit_equals_least_squares_on_the_written_out_codes(bits, signed):
    x = data(signed, n=60) + (0.0 if signed else 0.05)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2**bits, x.shape, generator=g)
    table = torch.tensor(codes_of(bits, signed), dtype=torch.float64)
    coords = refit_levels(codes, x, bits, signed)
    for c in range(3):
        design = table[codes[c]]
        solution = torch.linalg.lstsq(design, x[c, :, None]).solution[:, 0]
        expected = solution.abs() if signed else solution
        assert torch.allclose(coords[c], expected, rtol=1e-7, atol=1e-9), c
    assert torch.equal(refit_levels(codes.T.contiguous().T, x, bits, signed), coords), "strided codes count alike"


@pytest.mark.parametrize(("bits", "signed"), CASES)
def test_uniform_levels_span_the_data_evenly(bits, signed):
    x = data(signed)
    table = levels(uniform_levels(x, bits, signed), signed).sort(dim=1).values
    top = x.abs().amax(dim=1) if signed else x.amax(dim=1)
    assert torch.allclose(table[:, -1], top) and torch.allclose(table[:, 0], -top if signed else torch.zeros_like(top))
    gaps = table.diff(dim=1)
    assert torch.allclose(gaps, gaps[:, :1].expand_as(gaps))


@pytest.mark.parametrize(("bits", "signed"), CASES)
def test_the_alternating_fit_never_raises_the_error_and_ends_at_a_fixed_point(bits, signed):
    """Each iteration's error is at most the previous one's; after enough iterations the codes are the nearest
    levels (brute force) and the coordinates the least-squares fit of those codes (brute force)."""
    x = data(signed, n=50, seed=bits)
    errors = [quantization_error(fit_levels(x, bits, signed, iterations=i), x, signed) for i in range(8)]
    for before, after in itertools.pairwise(errors):
        assert torch.all(after <= before + 1e-12)
    assert torch.all(errors[-1] < errors[0]), "the fit improves on the uniform levels"
    coords = fit_levels(x, bits, signed, iterations=200)
    codes = nearest_levels(coords, x, signed)
    table = torch.tensor(codes_of(bits, signed), dtype=torch.float64)
    for c in range(3):
        values = levels(coords, signed)[c]
        assert [values[k].item() for k in codes[c]] == [brute_force_nearest(values.tolist(), v) for v in x[c].tolist()]
        solution = torch.linalg.lstsq(table[codes[c]], x[c, :, None]).solution[:, 0]
        expected = solution.abs() if signed else solution
        assert torch.allclose(levels(coords[c:c + 1], signed), levels(expected[None], signed), atol=1e-7), c


@pytest.mark.parametrize(("bits", "signed"), CASES)
@pytest.mark.parametrize("start", ["uniform", "random"])
def test_each_iteration_refits_the_nearest_codes_unless_that_raises_the_error(bits, signed, start):
    """``fit_levels`` is, iteration by iteration, :func:`nearest_levels` then :func:`refit_levels` (both checked
    against brute force above), the refit kept per channel where it does not raise the error."""
    x = data(signed, n=50, seed=bits + 10)
    g = torch.Generator().manual_seed(bits)
    first = uniform_levels(x, bits, signed) if start == "uniform" else torch.rand(3, bits, generator=g).double()
    coords = first
    for iterations in range(1, 4):
        refit = refit_levels(nearest_levels(coords, x, signed), x, bits, signed)
        better = quantization_error(refit, x, signed) <= quantization_error(coords, x, signed)
        coords = torch.where(better[:, None], refit, coords)
        assert torch.equal(fit_levels(x, bits, signed, coords=first, iterations=iterations), coords)


@pytest.mark.parametrize(("bits", "signed"), CASES)
def test_coordinates_that_quantize_exactly_are_kept(bits, signed):
    """Inputs all at one level of the coordinates: the refit (which rounds, and for signed codes spreads the
    value over the bases) would raise the error from exactly 0, so the coordinates stay as they are."""
    coords = torch.tensor([[0.75] + [0.0] * (bits - 1)], dtype=torch.float64)
    x = torch.full((1, 20), 0.75, dtype=torch.float64)
    assert torch.equal(fit_levels(x, bits, signed, coords=coords, iterations=3), coords)
    assert quantization_error(coords, x, signed).item() == 0


def test_one_signed_bit_fits_the_mean_absolute_value():
    """With one ±1 basis the optimum is ``γ = mean |x|`` (signs of ``x``), reached in one refit."""
    x = data(True)
    assert torch.allclose(fit_levels(x, 1, True, iterations=1)[:, 0], x.abs().mean(dim=1))


def test_unsigned_levels_keep_zero_exact():
    x = data(False)
    coords = fit_levels(x, 2, False)
    assert torch.all(coords >= 0)
    zeros = torch.zeros(3, 5, dtype=torch.float64)
    assert torch.equal(quantize_activations(zeros, coords, False), zeros)


@pytest.mark.parametrize("signed", [True, False])
def test_the_gradient_passes_straight_through_inside_the_levels_and_is_zero_outside(signed):
    coords = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    table = levels(coords, signed)
    low, high = table.min().item(), table.max().item()
    x = torch.tensor([[low - 0.1, low, (low + high) / 2, high, high + 0.1, 0.3]], dtype=torch.float64,
                     requires_grad=True)
    y = quantize_activations(x, coords, signed)
    assert y.shape == x.shape
    assert torch.equal(y.detach(), table.gather(1, nearest_levels(coords, x.detach(), signed)))
    upstream = torch.arange(1.0, 7.0, dtype=torch.float64)[None]
    y.backward(upstream)
    assert torch.equal(x.grad, upstream * torch.tensor([[0.0, 1, 1, 1, 0, 1]], dtype=torch.float64))
