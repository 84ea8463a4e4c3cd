"""The budgeted selection over entries spread across processes equals ``select_budget`` over all of them.

The processes are simulated by threads that sum their histograms through a barrier, each holding an arbitrary
(not contiguous) part of one global list.
"""
import threading

import pytest
import torch

from alq_lightning.core import select_budget
from alq_lightning.core.sharded import order_keys, select_budget_sharded


def run_ranks(scores, bits, owner, world, bits_to_remove):
    """Each of ``world`` threads selects over the entries ``owner == rank``; returns the union as one mask."""
    barrier = threading.Barrier(world)
    slots: list = [None] * world
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    errors = []

    def all_reduce(tensor, rank):
        slots[rank] = tensor.clone()
        barrier.wait()
        total = torch.stack(slots).sum(0)
        barrier.wait()
        return tensor.copy_(total)

    def rank_job(rank):
        try:
            mine = (owner == rank).nonzero().flatten()
            part = select_budget_sharded(scores[mine], bits[mine], mine, bits_to_remove,
                                         lambda t: all_reduce(t, rank))
            chosen[mine[part]] = True
        except Exception as error:  # surfaced below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=rank_job, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return chosen


def entries(seed, size=300):
    """Scores with many ties, both zeros, negatives, ``+inf`` (not selectable); integer bits, some 0."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-6, 7, (size,), generator=g).double() / 4
    scores[torch.rand(size, generator=g) < 0.1] = float("inf")
    scores[torch.rand(size, generator=g) < 0.05] = -0.0
    scores[torch.rand(size, generator=g) < 0.2] += 1e-12  # next to a tie, not in it
    bits = torch.randint(0, 40, (size,), generator=g).double()
    return scores, bits


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_selection_equals_single_process_selection(seed, world):
    scores, bits = entries(seed)
    owner = torch.randint(0, world, scores.shape, generator=torch.Generator().manual_seed(seed + 100))
    finite_bits = float(bits[torch.isfinite(scores)].sum())
    for request in (0.0, 1.0, 17.5, 500.0, finite_bits / 2, finite_bits - 1, finite_bits, finite_bits + 1, 1e9):
        expected = select_budget(scores, bits, request)
        assert torch.equal(run_ranks(scores, bits, owner, world, request), expected), request


def test_order_keys_order_as_the_scores():
    values = torch.tensor([-float("inf"), -1e300, -2.5, -1.0, -1e-310, -0.0, 0.0, 1e-310, 1.0, 2.5, 1e300,
                           float("inf")], dtype=torch.float64)
    keys = order_keys(values)
    unsigned = [int(k) & ((1 << 64) - 1) for k in keys]  # the order the bytes compare in
    assert unsigned[5] == unsigned[6], "-0.0 and +0.0 are one score"
    del unsigned[5]
    assert all(a < b for a, b in zip(unsigned, unsigned[1:]))
