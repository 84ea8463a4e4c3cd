"""Callbacks and helpers that record what a run did: bits at each round's end, seconds per stage."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from alq_lightning.callbacks import ALQCallback, ALQStage, BasisRefit, BitwidthReduction, CoordinateRefit, STEFineTune


class StageClock:
    """Seconds spent per named stage, summed over repeated visits."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def rounded(self) -> dict[str, float]:
        return {name: round(seconds, 3) for name, seconds in self.seconds.items()}


def stage_kind(callback: ALQCallback, stage: ALQStage | None) -> str:
    """``basis``, ``coordinate``, ``pruning``, ``ste`` or ``final_coordinate`` (``idle`` outside every window)."""
    if isinstance(stage, BitwidthReduction):
        return "pruning"
    if isinstance(stage, STEFineTune):
        return "ste"
    if isinstance(stage, BasisRefit):
        return "basis"
    if isinstance(stage, CoordinateRefit):
        last_pruning = max(s.end_epoch for s in callback.stages if isinstance(s, BitwidthReduction))
        return "final_coordinate" if stage.start_epoch >= last_pruning else "coordinate"
    return "idle"


def metric(trainer: Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


class ALQRecorder(Callback):
    """Records, during an ``ALQCallback`` run, the average bits and validation accuracy at the end of every
    pruning window (one row per round) and the seconds of initialisation and of each stage kind (with its
    validation). Place it before the ``ALQCallback`` in ``callbacks`` so that initialisation is timed."""

    def __init__(self, callback: ALQCallback, clock: StageClock) -> None:
        self.callback, self.clock = callback, clock
        self.rounds: list[dict[str, Any]] = []
        self.initial_bits: float | None = None
        self._start: float | None = None
        self._init_open = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._init_open = time.perf_counter(), True

    def _close_init(self) -> None:
        if self._init_open:
            self.clock.add("init", time.perf_counter() - self._start)
            self._init_open = False
            self.initial_bits = self.callback.network.initial_bits

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close_init()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close_init()
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        self.clock.add(stage_kind(self.callback, self.callback.stage_at(epoch)), time.perf_counter() - self._start)
        pruning = [s for s in self.callback.stages if isinstance(s, BitwidthReduction)]
        for stage in pruning:
            if stage.end_epoch == epoch + 1:
                self.rounds.append({
                    "round": stage.round_index,
                    "epoch": epoch,
                    "avg_bits": float(self.callback.network.avg_bits),
                    "budget_bits": float(stage.budget(trainer, stage.epochs * stage.steps_per_epoch(trainer) - 1)),
                    "val_acc": metric(trainer, "val/acc"),
                })
