"""The bit budget of iterative bitwidth reduction.

With initial average ``b0``, target ``b*`` and ``R`` rounds, round ``r`` ends at the geometric budget
``b_r = b0 · (b*/b0)^(r/R)`` (so ``b_R = b*``); within a round of ``S`` steps the budget falls linearly from
``b_{r-1}`` to ``b_r``, reaching it on the last step. A target above ``b0`` never adds bits back.
"""
from __future__ import annotations


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
