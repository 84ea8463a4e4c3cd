"""bench/levers.py: the prototype floor of one live basis per group."""
from __future__ import annotations

from types import SimpleNamespace

import torch


def test_floor_makes_only_the_last_live_slot_of_a_group_unremovable(bench_module):
    levers = bench_module("levers")
    mask = torch.tensor([[True, False, False], [True, True, False], [False, False, False], [False, True, False]])
    scores = torch.tensor([[0.1, 9.0, 9.0], [0.2, 0.3, 9.0], [9.0, 9.0, 9.0], [9.0, -0.5, 9.0]])
    floored = levers.floored(lambda state, p, h: p)(SimpleNamespace(mask=mask), scores, None)
    expected = scores.clone()
    expected[0, 0] = expected[3, 1] = torch.inf  # the only live slot of groups 0 and 3; group 1 keeps its scores
    assert torch.equal(floored, expected)
