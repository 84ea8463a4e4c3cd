"""What an ALQ fit shows while it runs: each stage's name (``basis 2/5``, ``pruning 2/5``, ``STE``, ``final``), and
that name with the average bits beside the module's metrics in any Lightning progress bar."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer

from .stages import ALQStage, BasisRefit, BitwidthReduction, STEFineTune


def stage_labels(stages: Sequence[ALQStage], rounds: int) -> list[tuple[ALQStage, str]]:
    """Each stage with its name: ``basis 2/5``, ``coordinate 2/5``, ``pruning 2/5`` (round 2 of ``rounds``), then
    ``STE`` and ``final`` (the final coordinate refit)."""
    done, labelled = 0, []
    for stage in stages:
        if isinstance(stage, BitwidthReduction):
            done += 1
            labelled.append((stage, f"pruning {stage.round_index}/{rounds}"))
        elif done == rounds:
            labelled.append((stage, "STE" if isinstance(stage, STEFineTune) else "final"))
        else:
            kind = "basis" if isinstance(stage, BasisRefit) else "coordinate"
            labelled.append((stage, f"{kind} {done + 1}/{rounds}"))
    return labelled


def show_in_bar(trainer: Trainer, owner: object, progress: Callable[[Trainer], dict[str, str]]) -> None:
    """Add ``progress(trainer)`` to the metrics of the Trainer's progress bar (any ``ProgressBar``), once per
    ``owner``."""
    bar = trainer.progress_bar_callback
    if bar is None or getattr(bar.get_metrics, "owner", None) is owner:
        return
    shown = bar.get_metrics

    def get_metrics(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        return {**shown(trainer, pl_module), **progress(trainer)}

    get_metrics.owner = owner
    bar.get_metrics = get_metrics
