"""The schedule (§4): the bit budget, geometric over rounds, linear within a round, ending exactly at the target;
the paper's epochs and their fitting into fewer."""
import random
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alq_lightning.core import (
    PAPER_SCHEDULE,
    check_target_bits,
    fit_schedule,
    round_budget,
    schedule_epochs,
    select_slots,
    step_budget,
)

budgets = st.tuples(st.floats(0.5, 8.0), st.floats(0.05, 1.0)).map(lambda t: (t[0], t[0] * t[1]))


@given(bits=budgets, rounds=st.integers(1, 8))
@settings(max_examples=50, deadline=None)
def test_round_budgets_are_geometric_and_exact_at_both_ends(bits, rounds):
    initial, target = bits
    path = [round_budget(initial, target, r, rounds) for r in range(rounds + 1)]
    assert path[0] == initial and path[-1] == target
    if target < initial:
        for r, b in enumerate(path):
            assert b == pytest.approx(initial * (target / initial) ** (r / rounds), rel=1e-12)
        ratios = [b / a for a, b in zip(path, path[1:])]
        assert ratios == pytest.approx([(target / initial) ** (1 / rounds)] * rounds, rel=1e-9)
        assert all(b <= a for a, b in zip(path, path[1:]))


@given(bits=budgets, rounds=st.integers(1, 5), steps=st.integers(1, 12))
@settings(max_examples=50, deadline=None)
def test_step_budgets_are_linear_within_a_round(bits, rounds, steps):
    initial, target = bits
    for r in range(1, rounds + 1):
        start, end = round_budget(initial, target, r - 1, rounds), round_budget(initial, target, r, rounds)
        got = [step_budget(initial, target, r, rounds, s, steps) for s in range(steps)]
        assert got[-1] == pytest.approx(end, rel=0, abs=1e-14 * initial)
        assert got == pytest.approx([start + (end - start) * (s + 1) / steps for s in range(steps)], rel=1e-12)
        assert all(b <= a for a, b in zip([start, *got], got))


def test_last_step_reaches_target_exactly():
    assert step_budget(1.0, 0.05, 1, 1, 0, 1) == round_budget(1.0, 0.05, 1, 1) == 0.05
    assert step_budget(3.0, 0.2, 2, 2, 3, 4) == 0.2


def test_round_budget_figures():
    assert [round_budget(4.0, 0.5, r, 3) for r in range(4)] == pytest.approx([4.0, 2.0, 1.0, 0.5], rel=1e-12)
    assert [step_budget(4.0, 0.5, 1, 3, s, 4) for s in range(4)] == pytest.approx([3.5, 3.0, 2.5, 2.0], rel=1e-12)


@pytest.mark.parametrize("target", [3.0, 3.5, 6.0])
def test_target_not_below_initial_means_no_reduction(target):
    assert all(round_budget(3.0, target, r, 4) == 3.0 for r in range(5))
    assert all(step_budget(3.0, target, r, 4, s, 3) == 3.0 for r in range(1, 5) for s in range(3))


@pytest.mark.parametrize(
    "args", [(3.0, 1.0, 0, 0), (3.0, 1.0, -1, 4), (3.0, 1.0, 5, 4), (3.0, 1.0, 1, -2)]
)
def test_round_budget_rejects_bad_indices(args):
    with pytest.raises(ValueError, match="round"):
        round_budget(*args)


@pytest.mark.parametrize("step,steps", [(0, 0), (3, 3), (-1, 3), (5, 3)])
def test_step_budget_rejects_bad_steps(step, steps):
    with pytest.raises(ValueError, match="step"):
        step_budget(3.0, 1.0, 1, 4, step, steps)


def test_step_budget_rejects_round_zero():
    with pytest.raises(ValueError, match="round"):
        step_budget(3.0, 1.0, 0, 4, 0, 3)


def test_check_target_bits():
    assert check_target_bits(1, 6) == 1.0 and isinstance(check_target_bits(1, 6), float)
    assert check_target_bits(0.4, 6) == 0.4
    for bad in (0, -1.0, 6, 7.5, True, "1", None, float("nan")):
        with pytest.raises(ValueError, match=r"target_bits.*max_bits=6"):
            check_target_bits(bad, 6)


def random_importance(mask, key):
    """Random Δℓ seeded by ``key`` (not by call order), +inf on dead slots."""
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.where(mask, torch.rand(mask.shape, generator=gen, dtype=torch.float64), torch.inf)


def run_reduction(layers, group_sizes, initial, target, rounds, steps, seed):
    """Smooth reduction driven by the schedule; returns the average bits after every round."""
    numel = sum(m.shape[0] * group_sizes[n] for n, m in layers.items())
    after_round = []
    for r in range(1, rounds + 1):
        for s in range(steps):
            live_bits = sum(int(m.sum()) * group_sizes[n] for n, m in layers.items())
            budget = step_budget(initial, target, r, rounds, s, steps) * numel
            importance = {n: random_importance(m, f"{seed}/{n}/{r}/{s}") for n, m in layers.items()}
            chosen = select_slots(importance, group_sizes, live_bits - budget)
            for n in layers:
                layers[n] &= ~chosen[n]
        after_round.append(sum(int(m.sum()) * group_sizes[n] for n, m in layers.items()) / numel)
    return after_round


@given(
    seed=st.integers(0, 10_000),
    target=st.floats(0.05, 2.5),
    rounds=st.integers(1, 4),
    steps=st.integers(1, 4),
)
@settings(max_examples=25, deadline=None)
def test_schedule_with_selection_hits_target_within_one_slot(seed, target, rounds, steps):
    """§6: the schedule hits target_bits (within one slot), identically whatever the layers' order."""
    rng = random.Random(seed)
    names = ["conv1", "conv2", "fc1", "fc2"]
    group_sizes = {n: rng.choice([1, 3, 9, 16]) for n in names}
    layers = {n: torch.ones(rng.randint(1, 6), 3, dtype=torch.bool) for n in names}
    numel = sum(m.shape[0] * group_sizes[n] for n, m in layers.items())
    initial = 3.0
    shuffled = {n: layers[n].clone() for n in rng.sample(names, len(names))}
    path = run_reduction(layers, group_sizes, initial, target, rounds, steps, seed)
    slot = max(group_sizes.values()) / numel
    for r, got in enumerate(path, start=1):
        budget = round_budget(initial, target, r, rounds)
        assert budget - slot < got <= budget
    assert target - slot < path[-1] <= target
    run_reduction(shuffled, group_sizes, initial, target, rounds, steps, seed)
    assert all(torch.equal(shuffled[n], layers[n]) for n in names)


def test_fit_schedule_keeps_the_paper_schedule_when_it_fits_and_scales_it_below():
    paper = {"rounds": 5, "basis_epochs": 20, "coordinate_epochs": 10, "pruning_epochs": 1, "ste_epochs": 50,
             "final_coordinate_epochs": 20}
    assert PAPER_SCHEDULE == paper and schedule_epochs(paper) == 225
    for epochs in (225, 226, 1000):
        assert fit_schedule(epochs) == paper
    # worked by hand from the documented rules: STE 50/225 and final 20/225 of the epochs (rounded down), up to
    # 5 rounds of at least 3 epochs, one pruning epoch each, the rest 2 : 1 basis : coordinate, leftovers final
    expected = {2: (1, 1, 0, 0, 0), 3: (1, 1, 1, 0, 0), 10: (2, 2, 1, 2, 0), 20: (5, 1, 1, 4, 1),
                100: (5, 9, 4, 22, 8), 224: (5, 20, 10, 49, 20)}
    for epochs, (rounds, basis, coordinate, ste, final) in expected.items():
        assert fit_schedule(epochs) == {"rounds": rounds, "basis_epochs": basis, "coordinate_epochs": coordinate,
                                        "pruning_epochs": 1, "ste_epochs": ste,
                                        "final_coordinate_epochs": final}, epochs


def test_a_fitted_schedule_fills_the_epochs_exactly_in_the_papers_proportions():
    previous = fit_schedule(2)
    for epochs in range(2, 226):
        schedule = fit_schedule(epochs)
        assert schedule_epochs(schedule) == epochs
        assert schedule["pruning_epochs"] == 1 and schedule["basis_epochs"] >= 1
        assert schedule["coordinate_epochs"] >= 0 and 1 <= schedule["rounds"] <= 5
        assert schedule["rounds"] == 5 or epochs < 24
        for key in ("ste_epochs", "rounds"):
            assert schedule[key] >= previous[key], (epochs, key)
        previous = schedule


@pytest.mark.parametrize("epochs", [1, 0, -3, 2.0, True])
def test_fit_schedule_refuses_fewer_than_two_epochs(epochs):
    with pytest.raises(ValueError, match=rf"epochs={epochs!r} cannot hold an ALQ schedule: it needs at least 2"):
        fit_schedule(epochs)
