"""Pure PyTorch math of ALQ: no Lightning, Hydra or W&B here."""
from .accounting import COORD_BITS, LayerBits, average_bits, check_coord_bits
from .layout import STRUCTURES, GroupLayout, auto_layout, parse_structure
from .multibit import (
    MAX_BITS_LIMIT,
    MultiBitState,
    all_patterns,
    check_max_bits,
    flip_negative,
    greedy_init,
    pattern_sums,
    refit_coords,
    slot_bits,
)
from .prune import group_importance, select_budget, select_groups, select_slots, slot_importance
from .schedule import PAPER_SCHEDULE, check_target_bits, fit_schedule, round_budget, schedule_epochs, step_budget
from .stats import AmsgradStats, QuadraticConfig, quadratic_model, update_stats
from .steps import (
    basis_step,
    coordinate_step,
    count_below,
    fit_bases,
    nearest_patterns,
    project_grad,
    rederive_coord_stats,
    ste_step,
)

__all__ = [
    "COORD_BITS", "LayerBits", "average_bits", "check_coord_bits",
    "STRUCTURES", "GroupLayout", "auto_layout", "parse_structure",
    "MAX_BITS_LIMIT", "MultiBitState", "all_patterns", "check_max_bits", "flip_negative", "greedy_init",
    "pattern_sums", "refit_coords", "slot_bits",
    "group_importance", "select_budget", "select_groups", "select_slots", "slot_importance",
    "PAPER_SCHEDULE", "check_target_bits", "fit_schedule", "round_budget", "schedule_epochs", "step_budget",
    "AmsgradStats", "QuadraticConfig", "quadratic_model", "update_stats",
    "basis_step", "coordinate_step", "count_below", "fit_bases", "nearest_patterns", "project_grad",
    "rederive_coord_stats", "ste_step",
]
