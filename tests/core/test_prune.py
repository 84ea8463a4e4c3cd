"""Importance (§4, bitwidth reduction) and the deterministic global selection under a bit budget."""
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alq_lightning.core import (
    MultiBitState,
    greedy_init,
    group_importance,
    select_budget,
    select_groups,
    select_slots,
    slot_importance,
)

F64 = torch.float64
INF = float("inf")


def model_change(p, h, d):
    """Change of the quadratic model pᵀd + ½ dᵀ diag(h) d for a step d (flat lists)."""
    return sum(pi * di for pi, di in zip(p, d)) + 0.5 * sum(hi * di * di for hi, di in zip(h, d))


def random_layer(seed, num_groups=5, max_bits=4, group_size=3):
    gen = torch.Generator().manual_seed(seed)
    state = greedy_init(torch.randn(num_groups, group_size, generator=gen, dtype=F64), max_bits)
    state.mask[0, 0] = False
    state.mask[1] = False
    p = torch.randn(num_groups, max_bits, generator=gen, dtype=F64)
    h = torch.rand(num_groups, max_bits, generator=gen, dtype=F64) + 0.1
    return state, p, h


@pytest.mark.parametrize("seed", range(3))
def test_slot_importance_is_model_change(seed):
    state, p, h = random_layer(seed)
    importance = slot_importance(state, p, h)
    num_groups, max_bits = state.mask.shape
    for g in range(num_groups):
        for k in range(max_bits):
            if not state.mask[g, k]:
                assert importance[g, k] == INF
                continue
            d = [0.0] * max_bits
            d[k] = -float(state.coords[g, k])  # removing the slot moves its coordinate to 0
            want = model_change(p[g].tolist(), h[g].tolist(), d)
            assert float(importance[g, k]) == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("seed", range(3))
def test_group_importance_is_model_change(seed):
    state, p, h = random_layer(seed)
    importance = group_importance(state, p, h)
    for g in range(state.num_groups):
        if not state.mask[g].any():
            assert importance[g] == INF
            continue
        d = [-float(a) if live else 0.0 for a, live in zip(state.coords[g], state.mask[g])]
        assert float(importance[g]) == pytest.approx(model_change(p[g].tolist(), h[g].tolist(), d), rel=1e-12)


def test_importance_hand_figures():
    state = MultiBitState(
        torch.zeros(1, 2, dtype=torch.uint8), torch.tensor([[2.0, 1.0, 5.0]], dtype=F64),
        torch.tensor([[True, True, False]]),
    )
    p = torch.tensor([[1.0, -1.0, 0.0]], dtype=F64)
    h = torch.tensor([[3.0, 2.0, 1.0]], dtype=F64)
    # slot 0: -1·2 + ½·3·4 = 4; slot 1: +1·1 + ½·2·1 = 2; slot 2 dead
    assert slot_importance(state, p, h).tolist() == [[4.0, 2.0, INF]]
    assert group_importance(state, p, h).tolist() == [6.0]


# ----------------------------------------------------------------------------------------------- selection oracle
def oracle_select(scores, bits, request):
    """Sort (score, name, flat index); take the shortest prefix whose bits reach ``request``. -> {(name, idx)}."""
    entries = sorted(
        (score, name, i, bits[name][i]) for name in scores for i, score in enumerate(scores[name]) if score != INF
    )
    chosen, saved = set(), 0.0
    for _, name, i, b in entries:
        if saved >= request:
            break
        chosen.add((name, i))
        saved += b
    return chosen


def as_set(selection):
    return {(name, i) for name, sel in selection.items() for i, v in enumerate(sel.reshape(-1).tolist()) if v}


layer_names = st.lists(st.sampled_from(["conv1", "conv2", "fc", "a.b", "A", "layer10", "layer9"]),
                       min_size=1, max_size=4, unique=True)


@st.composite
def slot_problems(draw):
    names = draw(layer_names)
    importance, group_sizes = {}, {}
    for name in names:
        g, k = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        # a few distinct values only, so that ties across layers and slots are common; inf marks dead slots
        values = draw(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 0.5, 1.0, 2.0, INF]), min_size=g * k, max_size=g * k))
        importance[name] = torch.tensor(values, dtype=F64).reshape(g, k)
        group_sizes[name] = draw(st.integers(1, 9))
    total = sum(int(torch.isfinite(s).sum()) * group_sizes[n] for n, s in importance.items())
    request = draw(st.one_of(st.integers(0, total + 10).map(float), st.floats(0, total + 10)))
    return importance, group_sizes, request


@given(problem=slot_problems(), per_bit=st.booleans(), seed=st.integers(0, 1000))
@settings(max_examples=50, deadline=None)
def test_select_slots_equals_oracle(problem, per_bit, seed):
    importance, group_sizes, request = problem
    chosen = select_slots(importance, group_sizes, request, per_bit=per_bit)
    assert set(chosen) == set(importance)
    for name, sel in chosen.items():
        assert sel.dtype == torch.bool and sel.shape == importance[name].shape
        assert not bool((sel & ~torch.isfinite(importance[name])).any()), "dead slots are never selected"
    scores = {n: [s / group_sizes[n] if per_bit else s for s in t.reshape(-1).tolist()] for n, t in importance.items()}
    bits = {n: [group_sizes[n]] * t.numel() for n, t in importance.items()}
    got = as_set(chosen)
    assert got == oracle_select(scores, bits, request)

    saved = sum(group_sizes[name] for name, _ in got)
    available = sum(int(torch.isfinite(s).sum()) * group_sizes[n] for n, s in importance.items())
    if request > available:
        assert saved == available, "asking for more than is live selects every live slot"
    elif request > 0:
        last = max(got, key=lambda e: (scores[e[0]][e[1]], e[0], e[1]))
        assert saved >= request and saved - group_sizes[last[0]] < request, "overshoot below one slot's bits"
    else:
        assert not got

    names = list(importance)
    random.Random(seed).shuffle(names)
    permuted = select_slots({n: importance[n] for n in names}, {n: group_sizes[n] for n in reversed(names)},
                            request, per_bit)
    assert all(torch.equal(permuted[n], chosen[n]) for n in importance), "independent of the mapping's order"


def test_select_slots_tie_break_by_layer_name_then_index():
    importance = {"b": torch.zeros(2, 2, dtype=F64), "a": torch.zeros(1, 3, dtype=F64)}
    chosen = select_slots(importance, {"a": 4, "b": 4}, 16)
    assert chosen["a"].tolist() == [[True, True, True]]
    assert chosen["b"].tolist() == [[True, False], [False, False]]


def test_select_slots_lowest_importance_first():
    importance = {"x": torch.tensor([[3.0, 1.0, INF], [0.5, 2.0, 4.0]], dtype=F64)}
    chosen = select_slots(importance, {"x": 10}, 25)  # three slots: 0.5, 1.0, 2.0
    assert chosen["x"].tolist() == [[False, True, False], [True, True, False]]
    assert select_slots(importance, {"x": 10}, 0)["x"].sum() == 0
    assert select_slots(importance, {"x": 10}, -5)["x"].sum() == 0
    assert select_slots(importance, {"x": 10}, 1e9)["x"].tolist() == [[True, True, False], [True, True, True]]


def test_per_bit_ranking_divides_by_group_size():
    importance = {"small": torch.tensor([[1.0]], dtype=F64), "big": torch.tensor([[3.0]], dtype=F64)}
    sizes = {"small": 2, "big": 10}  # per bit: 0.5 vs 0.3
    assert select_slots(importance, sizes, 1)["small"].item() is True
    per_bit = select_slots(importance, sizes, 1, per_bit=True)
    assert per_bit["big"].item() is True and per_bit["small"].item() is False


@st.composite
def group_problems(draw):
    names = draw(layer_names)
    importance, live_bits = {}, {}
    for name in names:
        g = draw(st.integers(1, 6))
        n = draw(st.integers(1, 5))
        live = draw(st.lists(st.integers(0, 4), min_size=g, max_size=g))
        values = draw(st.lists(st.sampled_from([-2.0, 0.0, 1.0, 3.0, 3.0]), min_size=g, max_size=g))
        live_bits[name] = torch.tensor(live) * n
        importance[name] = torch.tensor([v if b else INF for v, b in zip(values, live)], dtype=F64)
    total = sum(int(b.sum()) for b in live_bits.values())
    return importance, live_bits, draw(st.floats(0, total + 5))


@given(problem=group_problems(), seed=st.integers(0, 1000))
@settings(max_examples=50, deadline=None)
def test_select_groups_equals_oracle(problem, seed):
    importance, live_bits, request = problem
    chosen = select_groups(importance, live_bits, request)
    scores = {
        n: [s / b if b > 0 else INF for s, b in zip(importance[n].tolist(), live_bits[n].tolist())] for n in importance
    }
    bits = {n: live_bits[n].tolist() for n in importance}
    got = as_set(chosen)
    assert got == oracle_select(scores, bits, request)
    assert all(bits[n][i] > 0 for n, i in got), "empty groups are never selected"
    saved = sum(bits[n][i] for n, i in got)
    available = sum(sum(b) for b in bits.values())
    if request > available:
        assert saved == available
    elif request > 0:
        last = max(got, key=lambda e: (scores[e[0]][e[1]], e[0], e[1]))
        assert saved >= request and saved - bits[last[0]][last[1]] < request
    names = list(importance)
    random.Random(seed).shuffle(names)
    permuted = select_groups({n: importance[n] for n in names}, live_bits, request)
    assert all(torch.equal(permuted[n], chosen[n]) for n in importance)


def test_select_budget_direct():
    scores = torch.tensor([2.0, INF, 1.0, 1.0, 0.0])
    bits = torch.tensor([1.0, 100.0, 2.0, 3.0, 4.0])
    assert select_budget(scores, bits, 5).tolist() == [False, False, True, False, True]
    assert select_budget(scores, bits, 6).tolist() == [False, False, True, False, True]
    assert select_budget(scores, bits, 6.5).tolist() == [False, False, True, True, True]
    assert select_budget(scores, bits, 50).tolist() == [True, False, True, True, True]
    assert select_budget(torch.zeros(0), torch.zeros(0), 3).tolist() == []


def test_select_budget_keeps_index_order_among_many_ties():
    """Equal scores are taken in index order, however many there are (an unstable sort would scramble them)."""
    scores = torch.tensor([1.0, 0.0] * 500, dtype=F64)
    chosen = select_budget(scores, torch.ones(1000, dtype=F64), 40)
    assert chosen.nonzero().flatten().tolist() == list(range(1, 80, 2))


def test_select_budget_counts_bits_beyond_float32_precision():
    """Budgets of large networks exceed 2^24 bits: a request one bit above a saving is still met, not rounded."""
    scores = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    bits = torch.tensor([2.0**24, 1.0, 1.0], dtype=F64)
    assert select_budget(scores, bits, 2.0**24 + 1).tolist() == [True, True, False]
    assert select_budget(scores, bits, 2.0**24).tolist() == [True, False, False]


def test_select_budget_takes_a_single_entry():
    assert select_budget(torch.tensor([1.0]), torch.tensor([4.0]), 2.0).tolist() == [True]
    assert select_budget(torch.tensor([INF]), torch.tensor([4.0]), 2.0).tolist() == [False]


def test_select_budget_equals_oracle_with_empty_unselectable_entries():
    """Unselectable entries without bits (empty groups: infinite score, no live bits) never change the selection."""
    rng = random.Random(0)
    for _ in range(300):
        scores = [rng.choice([-1.0, 0.0, 1.0, 3.5, INF, INF]) for _ in range(rng.randint(1, 10))]
        bits = [0.0 if score == INF and rng.random() < 0.7 else float(rng.randint(1, 8)) for score in scores]
        request = rng.choice([0.5, 1.0, 3.0, 7.0, 20.0, sum(b for s, b in zip(scores, bits) if s != INF)])
        chosen = select_budget(torch.tensor(scores, dtype=F64), torch.tensor(bits, dtype=F64), request)
        assert as_set({"x": chosen}) == oracle_select({"x": scores}, {"x": bits}, request)


def test_select_groups_never_picks_a_group_without_live_bits():
    """A group with no live bits saves nothing, so it is never selected, whatever importance it is given."""
    importance = {"x": torch.tensor([0.0, -1.0, 5.0], dtype=F64)}
    live_bits = {"x": torch.tensor([6, 0, 4])}
    assert select_groups(importance, live_bits, 1)["x"].tolist() == [True, False, False]
    assert select_groups(importance, live_bits, 100)["x"].tolist() == [True, False, True]


def test_select_groups_ranks_one_bit_groups_per_bit():
    """Loss per bit saved: a 1-bit group of importance 1 (1 per bit) goes after a 3-bit group of 2 (2/3 per bit)."""
    importance = {"x": torch.tensor([1.0, 2.0], dtype=F64)}
    assert select_groups(importance, {"x": torch.tensor([1, 3])}, 1)["x"].tolist() == [False, True]


def test_slot_selection_from_real_importance():
    """End to end on two layers: the removed slots are the smallest Δℓ, and removing them costs Σ Δℓ in the model."""
    layers = {name: random_layer(seed) for name, seed in (("l1", 1), ("l2", 2))}
    importance = {name: slot_importance(*layer) for name, layer in layers.items()}
    chosen = select_slots(importance, {"l1": 3, "l2": 3}, 12)
    picked = sorted(float(importance[n][chosen[n]].max()) for n in chosen if chosen[n].any())
    rest = [float(v) for n in chosen for v in importance[n][~chosen[n]].tolist() if v != INF]
    assert sum(int(c.sum()) for c in chosen.values()) == 4
    assert max(picked) <= min(rest)
