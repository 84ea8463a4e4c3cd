"""The epochs of the ALQ schedule and the bit budget of iterative bitwidth reduction.

A schedule is ``rounds`` × (basis, coordinate, pruning epochs), then STE and final coordinate epochs; the paper
uses 5 × (20 + 10 + 1) + 50 + 20 = 225 epochs (:data:`PAPER_SCHEDULE`), :func:`fit_schedule` scales it into fewer.

With initial average ``b0``, target ``b*`` and ``R`` rounds, round ``r`` ends at the geometric budget
``b_r = b0 · (b*/b0)^(r/R)`` (so ``b_R = b*``); within a round of ``S`` steps the budget falls linearly from
``b_{r-1}`` to ``b_r``, reaching it on the last step. A target above ``b0`` never adds bits back.
"""
from __future__ import annotations

PAPER_SCHEDULE = {"rounds": 5, "basis_epochs": 20, "coordinate_epochs": 10, "pruning_epochs": 1, "ste_epochs": 50,
                  "final_coordinate_epochs": 20}


def schedule_epochs(schedule: dict[str, int]) -> int:
    """Epochs of a schedule (the keys of :data:`PAPER_SCHEDULE`)."""
    per_round = schedule["basis_epochs"] + schedule["coordinate_epochs"] + schedule["pruning_epochs"]
    return schedule["rounds"] * per_round + schedule["ste_epochs"] + schedule["final_coordinate_epochs"]


def fit_schedule(epochs: int) -> dict[str, int]:
    """The paper's schedule in ``epochs`` epochs (at least 2), in its proportions.

    From 225 epochs on it is the paper's own. Below, STE and final coordinate epochs take their shares (50/225,
    20/225, rounded down); the rest is split into up to 5 rounds of at least 3 epochs (fewer rounds when that
    many do not fit), each with one pruning epoch and its other epochs 2 : 1 between basis (at least one) and
    coordinate steps; epochs left over by the split go to the final coordinate epochs. The epochs add up to
    ``epochs`` exactly.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 2:
        raise ValueError(f"epochs={epochs!r} cannot hold an ALQ schedule: it needs at least 2 (one basis and one "
                         f"pruning epoch)")
    paper = schedule_epochs(PAPER_SCHEDULE)
    if epochs >= paper:
        return dict(PAPER_SCHEDULE)
    ste = epochs * PAPER_SCHEDULE["ste_epochs"] // paper
    final = epochs * PAPER_SCHEDULE["final_coordinate_epochs"] // paper
    rest = epochs - ste - final
    rounds = min(PAPER_SCHEDULE["rounds"], max(1, rest // 3))
    per_round = rest // rounds
    basis = max(1, round((per_round - 1) * 2 / 3))
    return {"rounds": rounds, "basis_epochs": basis, "coordinate_epochs": per_round - 1 - basis, "pruning_epochs": 1,
            "ste_epochs": ste, "final_coordinate_epochs": final + rest - rounds * per_round}


def check_target_bits(target_bits: float, max_bits: int) -> float:
    """Validate ``target_bits`` (a number in ``(0, max_bits)``) and return it as a float."""
    if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)) or not 0 < target_bits < max_bits:
        raise ValueError(f"target_bits={target_bits!r} must be a number in (0, max_bits={max_bits})")
    return float(target_bits)


def round_budget(initial_bits: float, target_bits: float, round_index: int, rounds: int) -> float:
    """Average-bits budget at the end of round ``round_index`` (``0..rounds``; 0 is the initial average)."""
    if rounds < 1 or not 0 <= round_index <= rounds:
        raise ValueError(f"round_index={round_index} must be in [0, rounds={rounds}] with rounds >= 1")
    if target_bits >= initial_bits:
        return initial_bits
    if round_index == rounds:
        return target_bits
    return initial_bits * (target_bits / initial_bits) ** (round_index / rounds)


def step_budget(
    initial_bits: float, target_bits: float, round_index: int, rounds: int, step: int, steps: int
) -> float:
    """Average-bits budget after step ``step`` (``0..steps-1``) of the pruning phase of round ``round_index``.

    ``round_index`` counts from 1; the last step of a round reaches :func:`round_budget` exactly.
    """
    if steps < 1 or not 0 <= step < steps:
        raise ValueError(f"step={step} must be in [0, steps={steps}) with steps >= 1")
    start = round_budget(initial_bits, target_bits, round_index - 1, rounds)
    end = round_budget(initial_bits, target_bits, round_index, rounds)
    return end if step == steps - 1 else start + (end - start) * (step + 1) / steps
