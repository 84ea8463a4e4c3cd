"""What the app needs of a LightningModule (the package's ``ClassifierModule`` or your own): a ``test_step`` that
logs ``test/acc`` and a ``validation_step`` that logs ``optimized_metric`` (``val/acc`` by default), checked before
any training epoch is spent."""
from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from alq_lightning.app.common import ConfigError

TEST_METRIC = "test/acc"


def check_test_step(module: LightningModule) -> None:
    """Refuse a module without a ``test_step``: the app reports its ``test/acc`` before and after ALQ."""
    if type(module).test_step is LightningModule.test_step:
        raise ConfigError(f"model: {type(module).__name__} defines no test_step; the app reports the test accuracy "
                          f"before and after ALQ: log it there with self.log({TEST_METRIC!r}, accuracy)")


class MetricContract(Callback):
    """Checks after one validation batch, before any training epoch (Lightning's sanity check, switched on for at
    least one batch), that the module logs ``metric``; a module that does not is refused with what it logs."""

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        trainer.num_sanity_val_steps = max(trainer.num_sanity_val_steps, 1)

    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logged = sorted(trainer.callback_metrics)
        if self.metric in logged:
            return
        others = [name for name in logged if name.startswith("val/")]
        instead = f"optimized_metric={others[0]}" if others else "optimized_metric=val/<a metric it logs>"
        raise ConfigError(f"model: {type(pl_module).__name__} logs no {self.metric!r} in its validation_step (one "
                          f"validation batch logged: {', '.join(logged) or 'nothing'}); log it there with "
                          f"self.log({self.metric!r}, value), or select on another metric it logs: {instead}")
