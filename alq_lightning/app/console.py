"""What a run says while it runs, through Python ``logging`` so that Hydra's job log (``train.log``) holds it all:
Lightning's messages and Python warnings routed there, the phases named, and a plain line per epoch with the time
left (a run redirected to a file shows its progress too), after the first batches the whole job's estimate."""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from alq_lightning.callbacks import ALQCallback

log = logging.getLogger("alq_lightning.app")

# A job whose training alone would take longer than this on a CPU is said to be GPU-sized.
GPU_SIZED_S = 3 * 3600
# Steps timed for the first estimate (after one step of warm-up).
TIMED_STEPS = 20
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
SHOWN_METRICS = ("train/loss_epoch", "train/acc", "val/loss", "val/acc")


class WithoutTips(logging.Filter):
    """Drops Lightning's "💡 Tip" lines: advertisements for its cloud products (litlogger, litmodels) printed by
    every Trainer, about nothing this run does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


def route_logging() -> None:
    """Send Lightning's messages and Python warnings to the root logger's handlers (under Hydra: the console and
    ``train.log``). Lightning gives its logger a handler of its own (which bypasses the root's) when it is imported
    before logging is configured, as it is before Hydra's; those handlers are removed once the root has its own."""
    logging.captureWarnings(True)
    if logging.getLogger().handlers:
        for name in LIGHTNING_LOGGERS:
            own = logging.getLogger(name)
            for handler in list(own.handlers):
                own.removeHandler(handler)
            own.propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, WithoutTips) for f in rank_zero.filters):
        rank_zero.addFilter(WithoutTips())
    # The run folder holds the run's own files by design (.hydra/, train.log, wandb/) beside its one last.ckpt,
    # and no two runs share a folder (results.json is never overwritten), so this warning never applies.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Lightning 2.6's own call of a torch API that torch 2.13 deprecates, raised inside Lightning's loops.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def duration(seconds: float) -> str:
    """``1:02:03`` (hours:minutes:seconds), days when longer: ``2 days, 3:04:05``."""
    return str(timedelta(seconds=round(seconds)))


@rank_zero_only
def phase(name: str, detail: str) -> None:
    """Name a phase of the run in the log: ``=== ALQ: 225 epochs to 0.7 average bits ===``."""
    log.info(f"=== {name}: {detail} ===")


@dataclass
class JobPlan:
    """The training phases of one job in run order with their epochs, and when the job started."""

    epochs: dict[str, int]
    start: float = field(default_factory=time.perf_counter)

    def after(self, phase: str) -> int:
        """Epochs of the phases after ``phase``."""
        names = list(self.epochs)
        return sum(self.epochs[name] for name in names[names.index(phase) + 1:])


class RunProgress(Callback):
    """Progress of training phase ``phase`` of ``plan`` in the log: after the first :data:`TIMED_STEPS` steps the
    time this phase and the whole job will take (and a plain warning when that is GPU-sized work on a machine
    without a GPU), then one line per epoch with its metrics, the ALQ stage and bits, and the time left."""

    def __init__(self, phase: str, plan: JobPlan) -> None:
        self.phase, self.plan = phase, plan
        self.timed_from: float | None = None
        self.steps = self.first_epoch = 0
        self.started = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.started, self.timed_from, self.steps = time.perf_counter(), None, 0
        self.first_epoch = trainer.current_epoch  # a resumed fit starts later

    @rank_zero_only
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if self.timed_from is None:
            self.timed_from = time.perf_counter()
            return
        self.steps += 1
        batches = trainer.num_training_batches
        if self.steps == min(TIMED_STEPS, batches - 1) and math.isfinite(batches):
            self.estimate(trainer, (time.perf_counter() - self.timed_from) / self.steps, int(batches))

    def estimate(self, trainer: Trainer, per_batch: float, batches: int) -> None:
        """State the time of this phase's training steps and of the whole job's (later phases at this speed)."""
        left = batches * (trainer.max_epochs - trainer.current_epoch) - trainer.fit_loop.epoch_loop.batch_idx - 1
        this = per_batch * left
        job = this + per_batch * batches * self.plan.after(self.phase)
        later = " and the later phases" if self.plan.after(self.phase) else ""
        log.info(f"{self.phase}: {per_batch * 1000:.0f} ms per training step; about {duration(this)} for this "
                 f"phase's {trainer.max_epochs} epochs, {duration(job)} for the whole job's training steps (this "
                 f"phase{later}, at this speed; validation adds to it)")
        if job > GPU_SIZED_S and not torch.cuda.is_available():
            log.warning(f"This job is GPU-sized: about {duration(job)} of training on this CPU, and no GPU is present "
                        "(torch.cuda.is_available() is False). Run it on a machine with a GPU (trainer=gpu), or "
                        "shrink it (experiment=smoke, fewer epochs in pretrain.epochs and alq.*_epochs).")

    @rank_zero_only
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        done = trainer.current_epoch + 1
        elapsed = time.perf_counter() - self.started
        remaining = max(trainer.max_epochs - done, 0) + self.plan.after(self.phase)
        metrics = trainer.callback_metrics
        shown = [f"{key} {float(metrics[key]):.4f}" for key in SHOWN_METRICS if key in metrics]
        alq = next((c for c in trainer.callbacks if isinstance(c, ALQCallback)), None)
        if alq is not None and alq.bits is not None:
            shown.insert(0, f"{alq.progress(trainer)['alq'] or 'done'} at {alq.bits:.3f} bits")
        per_epoch = elapsed / (done - self.first_epoch)
        log.info(f"{self.phase} epoch {done}/{trainer.max_epochs}: {', '.join(shown)}; {duration(elapsed)} in this "
                 f"phase, about {duration(per_epoch * remaining)} left in the job")
