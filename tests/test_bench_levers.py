"""bench/levers.py: the prototype floor of one live basis per group."""
from __future__ import annotations

from types import SimpleNamespace

import torch


def test_floor_keeps_the_most_important_live_slot_of_every_group(bench_module):
    """One selection may remove several slots of a group: the floor must protect one of every group that has a
    live slot (the most important one), not only the last one left."""
    levers = bench_module("levers")
    mask = torch.tensor([[True, False, False], [True, True, False], [False, False, False], [False, True, True]])
    scores = torch.tensor([[0.1, 9.0, 9.0], [0.3, 0.2, 9.0], [9.0, 9.0, 9.0], [9.0, -0.5, -0.7]])
    floored = levers.floored(lambda state, p, h: p)(SimpleNamespace(mask=mask), scores, None)
    expected = scores.clone()
    expected[0, 0] = expected[1, 0] = expected[3, 1] = torch.inf  # group 2 has no live slot: unchanged
    assert torch.equal(floored, expected)
