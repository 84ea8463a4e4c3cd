"""Greedy initialisation (structured sketching, §2) against a per-group least-squares oracle."""
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from alq_lightning.core import GroupLayout, MultiBitState, greedy_init


def oracle_sketch(w, max_bits, tol=1e-6):
    """§2 for one group, in float64.

    Returns (slots as [(alpha >= 0, beta)] sorted by alpha, reconstruction, ambiguous): ``ambiguous`` is set when
    a residual entry was zero up to rounding, so that sign(r) (and all later choices) depend on rounding.
    """
    w = np.asarray(w, dtype=np.float64)
    norm = float(w @ w)
    if norm == 0:
        return [], np.zeros_like(w), False
    columns, residual, ambiguous = [], w.copy(), False
    for _ in range(max_bits):
        ambiguous |= bool(columns) and bool((np.abs(residual) < 1e-9 * np.sqrt(norm)).any())
        columns.append(np.where(residual >= 0, 1.0, -1.0))  # sign(0) = +1
        basis = np.stack(columns, axis=1)
        alpha = np.linalg.lstsq(basis, w, rcond=None)[0]
        residual = w - basis @ alpha
        if residual @ residual < tol * norm:
            break
    slots = [(abs(a), np.sign(a) * b if a != 0 else b) for a, b in zip(alpha, basis.T)]
    slots.sort(key=lambda slot: slot[0])
    return slots, basis @ alpha, ambiguous


def check_invariants(state, max_bits, n):
    g = state.num_groups
    assert state.bases.shape == (g, max_bits, n) and state.bases.dtype == torch.int8
    assert state.coords.shape == (g, max_bits) and state.mask.shape == (g, max_bits) and state.mask.dtype == torch.bool
    assert bool(((state.bases == 1) | (state.bases == -1)).all())
    assert torch.isfinite(state.coords).all()
    assert bool((state.coords >= 0).all())
    live = state.mask.sum(dim=1)
    for row in range(g):
        i = int(live[row])
        assert state.mask[row, :i].all() and not state.mask[row, i:].any(), "live slots first, dead after"
        assert torch.all(state.coords[row, 1:i] >= state.coords[row, : i - 1]) if i > 1 else True
        assert torch.all(state.coords[row, i:] == 0)
    assert bool((state.bases[~state.mask] == 1).all()), "dead slots keep β = +1"


def relative_errors(state, w):
    err = (state.reconstruct() - w).square().sum(dim=1)
    return err / w.square().sum(dim=1).clamp(min=1e-300)


def test_matches_oracle():
    """Every group the oracle can decide (no residual entry zero up to rounding) has the oracle's slots,
    reconstruction and error, and each distinct nonzero coordinate the oracle's basis; the comparisons ran for at
    least 30% of the groups and half of their slots."""
    groups, slots_checked = [], []

    @given(
        seed=st.integers(0, 2**31 - 1),
        num_groups=st.integers(1, 6),
        group_size=st.integers(1, 12),
        max_bits=st.integers(1, 8),
        zero_rows=st.integers(0, 2),
    )
    @settings(max_examples=50, deadline=None, database=None)
    def check(seed, num_groups, group_size, max_bits, zero_rows):
        w = torch.randn(num_groups, group_size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        w[:zero_rows] = 0
        state = greedy_init(w, max_bits)
        check_invariants(state, max_bits, group_size)
        rec = state.reconstruct()
        for g in range(num_groups):
            slots, oracle_rec, ambiguous = oracle_sketch(w[g].numpy(), max_bits)
            groups.append(not ambiguous)
            if ambiguous:
                continue
            scale = float(w[g].norm()) + 1e-300
            assert int(state.mask[g].sum()) == len(slots)
            np.testing.assert_allclose(rec[g].numpy(), oracle_rec, rtol=0, atol=1e-9 * scale)
            err, oracle_err = float((rec[g] - w[g]).square().sum()), float(((oracle_rec - w[g].numpy()) ** 2).sum())
            assert abs(err - oracle_err) <= 1e-9 * scale**2
            for k, (alpha, beta) in enumerate(slots):
                assert float(state.coords[g, k]) == pytest.approx(alpha, rel=1e-9, abs=1e-12 * scale)
                distinct = all(abs(alpha - other) > 1e-7 * scale for j, (other, _) in enumerate(slots) if j != k)
                slots_checked.append(distinct and alpha > 1e-9 * scale)
                if slots_checked[-1]:
                    assert state.bases[g, k].tolist() == beta.astype(int).tolist()

    check()
    assert sum(groups) >= 0.3 * len(groups) and sum(slots_checked) >= 0.5 * len(slots_checked), \
        f"{sum(groups)}/{len(groups)} groups and {sum(slots_checked)}/{len(slots_checked)} bases compared"


def test_layers_of_every_structure():
    """Each structure's layer round-trips through the sketch with the oracle's reconstruction for every group the
    oracle can decide; at least 30% of the groups were compared."""
    compared = []

    @given(
        seed=st.integers(0, 2**31 - 1),
        shape=st.sampled_from([(3, 2, 3), (2, 3, 2, 2), (2, 2, 1, 2, 2), (4, 1, 3, 3), (3, 12)]),
        structure=st.sampled_from(["kernelwise", "pixelwise", "channelwise", "subchannelwise(1)",
                                   "subchannelwise(3)"]),
        max_bits=st.integers(1, 8),
    )
    @settings(max_examples=40, deadline=None, database=None)
    def check(seed, shape, structure, max_bits):
        name, subchannels = structure.partition("(")[0], int(structure.partition("(")[2].rstrip(")") or 1)
        assume((name == "subchannelwise") == (len(shape) == 2))
        layout = GroupLayout(name, shape, subchannels)
        w = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        state = greedy_init(layout.to_groups(w), max_bits)
        check_invariants(state, max_bits, layout.group_size)
        rebuilt = layout.from_groups(state.reconstruct())
        assert rebuilt.shape == w.shape
        groups = layout.to_groups(w)
        for g in range(layout.num_groups):
            slots, oracle_rec, ambiguous = oracle_sketch(groups[g].numpy(), max_bits)
            compared.append(not ambiguous)
            if not ambiguous:
                np.testing.assert_allclose(layout.to_groups(rebuilt)[g].numpy(), oracle_rec,
                                           atol=1e-9 * float(groups[g].norm()))

    check()
    assert sum(compared) >= 0.3 * len(compared), f"only {sum(compared)}/{len(compared)} groups compared"


@given(
    seed=st.integers(0, 2**31 - 1),
    num_groups=st.integers(1, 5),
    group_size=st.integers(1, 16),
)
@settings(max_examples=30, deadline=None)
def test_error_non_increasing_in_max_bits(seed, num_groups, group_size):
    w = torch.randn(num_groups, group_size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    errors = [relative_errors(greedy_init(w, k), w) for k in range(1, 9)]
    for fewer, more in zip(errors, errors[1:]):
        assert bool((more <= fewer + 1e-9).all())


@pytest.mark.parametrize("group_size", [1, 2, 3, 5, 8])
def test_exact_when_max_bits_reaches_group_size(group_size):
    w = torch.randn(64, group_size, dtype=torch.float64, generator=torch.Generator().manual_seed(group_size))
    # without early stop, n independent ±1 bases span R^n
    assert bool((relative_errors(greedy_init(w, group_size, tol=0.0), w) < 1e-10).all())
    for max_bits in range(group_size, 9):
        state = greedy_init(w, max_bits)
        rel = relative_errors(state, w)
        assert bool((rel < 1e-6).all()), "every group ends below the stopping threshold"
        full = state.mask.sum(dim=1) == group_size
        assert bool((rel[full] < 1e-10).all())


@pytest.mark.parametrize("group_size", [1, 2, 3, 4, 7])
def test_zero_tolerance_never_stops_early(group_size):
    """With ``tol = 0`` the stopping test ``‖r‖²/‖w‖² < tol`` never holds: every nonzero group takes all ``max_bits``
    slots, also once its residual is exactly zero, and the sketch stays exact with ``α >= 0`` (signs moved into β)."""
    w = torch.randn(32, group_size, dtype=torch.float64, generator=torch.Generator().manual_seed(group_size))
    w[0] = 0
    w[1] = 0.75 * torch.where(torch.arange(group_size) % 2 == 0, 1.0, -1.0)  # exact with one slot
    for max_bits in range(group_size, 9):
        state = greedy_init(w, max_bits, tol=0.0)
        check_invariants(state, max_bits, group_size)
        assert state.mask.sum(dim=1).tolist() == [0] + [max_bits] * 31
        torch.testing.assert_close(state.reconstruct(), w, rtol=0, atol=1e-9)


def test_sign_of_zero_is_plus_one():
    state = greedy_init(torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, -2.0, 0.0, 0.0]], dtype=torch.float64), 1)
    assert state.bases[:, 0].tolist() == [[1, 1, 1, 1], [1, -1, 1, 1]]
    expected = torch.tensor([[1.25] * 4, [0.5, -0.5, 0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(state.reconstruct(), expected, rtol=1e-12, atol=0)


def test_all_zero_groups_get_no_slot():
    w = torch.zeros(3, 4, dtype=torch.float64)
    w[1] = torch.tensor([1.0, -2.0, 3.0, 0.5])
    state = greedy_init(w, 4)
    check_invariants(state, 4, 4)
    assert state.mask[[0, 2]].sum() == 0 and state.mask[1].sum() > 0
    assert torch.equal(state.coords[[0, 2]], torch.zeros(2, 4, dtype=torch.float64))
    assert torch.equal(state.reconstruct()[[0, 2]], torch.zeros(2, 4, dtype=torch.float64))


def test_early_stop_leaves_slots_dead():
    beta = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    w = torch.stack([0.7 * beta, torch.tensor([3.0, 1.0, 3.0, 1.0, 3.0], dtype=torch.float64)])
    state = greedy_init(w, 6)
    check_invariants(state, 6, 5)
    assert state.mask.sum(dim=1).tolist() == [1, 2]
    assert float(state.coords[0, 0]) == pytest.approx(0.7, rel=1e-12)
    assert state.bases[0, 0].tolist() == [1, -1, -1, 1, 1]
    torch.testing.assert_close(state.reconstruct(), w, rtol=0, atol=1e-12)
    # [3,1,3,1,3] = 2·(+1,…) + 1·(+1,-1,+1,-1,+1): coordinates {1, 2}
    torch.testing.assert_close(state.coords[1, :2], torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_slot_order_and_flips_on_hand_example():
    # w = [4, 2, -2]: β1 = (+,+,-), α1 = 8/3; r = (4/3, -2/3, 2/3) -> β2 = (+,-,+); refit α = (2, 2/...)
    w = torch.tensor([[4.0, 2.0, -2.0]], dtype=torch.float64)
    state = greedy_init(w, 2)
    slots, rec, ambiguous = oracle_sketch(w[0].numpy(), 2)
    assert not ambiguous
    np.testing.assert_allclose(state.reconstruct()[0].numpy(), rec, atol=1e-12)
    np.testing.assert_allclose(state.coords[0].numpy(), [s[0] for s in slots], atol=1e-12)
    assert state.bases[0].tolist() == [s[1].astype(int).tolist() for s in slots]


def test_independent_of_batch():
    w = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    batched = greedy_init(w, 5)
    for g in range(7):
        alone = greedy_init(w[g : g + 1], 5)
        assert torch.equal(alone.mask[0], batched.mask[g])
        torch.testing.assert_close(alone.reconstruct()[0], batched.reconstruct()[g], rtol=0, atol=1e-12)


@pytest.mark.parametrize("block", [1, 18, 24, 41, 1 << 20])
def test_blocks_of_groups_give_the_same_sketch(block):
    """Groups are sketched independently, so any block size (1, 2, 3 or 7 blocks of 7 groups of 6) gives the
    same state."""
    w = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    whole, blocked = greedy_init(w, 4), greedy_init(w, 4, block=block)
    assert torch.equal(blocked.codes, whole.codes) and torch.equal(blocked.mask, whole.mask)
    torch.testing.assert_close(blocked.coords, whole.coords, rtol=1e-12, atol=1e-14)


def test_float32_follows_float64():
    w = torch.randn(20, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    state32 = greedy_init(w.float(), 4)
    state64 = greedy_init(w, 4)
    assert state32.coords.dtype == torch.float32 and torch.isfinite(state32.coords).all()
    check_invariants(state32, 4, 9)
    torch.testing.assert_close(state32.reconstruct().double(), state64.reconstruct(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_sketched_in_float32(dtype):
    """Half-precision weights are sketched in float32: the same state as the float32 sketch of the same values."""
    w = torch.randn(20, 9, generator=torch.Generator().manual_seed(6)).to(dtype)
    state, reference = greedy_init(w, 4), greedy_init(w.float(), 4)
    assert state.coords.dtype == torch.float32
    assert torch.equal(state.codes, reference.codes) and torch.equal(state.mask, reference.mask)
    torch.testing.assert_close(state.coords, reference.coords, rtol=0, atol=0)


@pytest.mark.parametrize("max_bits", [0, 9, -1, 2.0, True, "3", None])
def test_max_bits_out_of_range(max_bits):
    with pytest.raises(ValueError, match=r"max_bits.*\[1, 8\]"):
        greedy_init(torch.ones(2, 3), max_bits)


def test_groups_must_be_two_dimensional():
    with pytest.raises(ValueError, match="groups"):
        greedy_init(torch.ones(2, 3, 4), 2)


def test_state_reconstruct_and_bits():
    bases = torch.tensor([[[1, -1], [1, 1], [-1, 1]]], dtype=torch.int8)
    coords = torch.tensor([[0.5, 2.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False, True]])
    state = MultiBitState.from_bases(bases, coords, mask)
    assert torch.equal(state.bases, bases) and state.codes.tolist() == [[1 | 2, 2 | 4]]
    assert state.reconstruct().tolist() == [[0.5 - 3.0, -0.5 + 3.0]]
    assert state.bits_per_group().tolist() == [2] and state.bits() == 4
    assert state.live_coords().tolist() == [[0.5, 0.0, 3.0]]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_blocks_of_groups_give_the_same_state(chunk):
    groups = torch.randn(37, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    whole, blocked = greedy_init(groups, 4, block=1 << 30), greedy_init(groups, 4, block=chunk)
    for key in ("codes", "coords", "mask"):
        assert torch.equal(getattr(whole, key), getattr(blocked, key)), key
