"""Metric loggers of the app: W&B (offline without an API key, CSV when W&B cannot start), CSV or none."""
from __future__ import annotations

import netrc
import os
import warnings
from argparse import Namespace
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from alq_lightning.app.common import ConfigError, to_container

LOGGER_KINDS = ("wandb", "csv", "none")
WANDB_MODES = ("online", "offline", "disabled")


def has_wandb_key() -> bool:
    """Whether W&B can authenticate: ``WANDB_API_KEY`` or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """``WANDB_MODE`` when set, else ``mode``; ``online`` becomes ``offline`` without an API key."""
    chosen = os.environ.get("WANDB_MODE") or mode
    if chosen == "dryrun":
        chosen = "offline"
    if chosen not in WANDB_MODES:
        raise ConfigError(f"logger.mode={chosen!r} (or WANDB_MODE) is not allowed; allowed: {', '.join(WANDB_MODES)}")
    if chosen == "online" and not has_wandb_key():
        warnings.warn("no W&B API key (WANDB_API_KEY or `wandb login`): logging offline; `wandb sync` uploads later",
                      stacklevel=2)
        return "offline"
    return chosen


def build_wandb(cfg: dict[str, Any]) -> Logger:
    """A started ``WandbLogger`` (its run exists once this returns)."""
    from lightning.pytorch.loggers import WandbLogger

    os.makedirs(cfg["save_dir"], exist_ok=True)
    logger = WandbLogger(project=cfg["project"], entity=cfg.get("entity"), group=cfg.get("group"),
                         name=cfg.get("name"), tags=list(cfg.get("tags") or []), save_dir=cfg["save_dir"],
                         mode=resolve_wandb_mode(cfg.get("mode", "online")))
    _ = logger.experiment  # starts the run now, so that a failure falls back to CSV
    return logger


def build_logger(cfg: DictConfig, config: dict[str, Any]) -> Logger | None:
    """The logger of the ``logger`` group with the resolved run ``config`` logged; None for ``none``."""
    options = to_container(cfg)
    kind = options.pop("kind", None)
    if kind not in LOGGER_KINDS:
        raise ConfigError(f"logger.kind={kind!r} is not allowed; allowed: {', '.join(LOGGER_KINDS)}")
    if kind == "none":
        return None
    logger: Logger | None = None
    if kind == "wandb":
        try:
            logger = build_wandb(options)
        except ConfigError:
            raise
        except Exception as err:  # W&B failures come in many types; any of them falls back to CSV
            warnings.warn(f"W&B is unavailable ({type(err).__name__}: {err}); logging to CSV instead", stacklevel=2)
            options = {"save_dir": options["save_dir"], "name": "csv"}
    if logger is None:
        logger = CSVLogger(save_dir=options["save_dir"], name=options.get("name", "csv"))
    logger.log_hyperparams(config)
    return logger


def is_wandb(logger: Logger | None) -> bool:
    return type(logger).__name__ == "WandbLogger"


def finish_logger(logger: Logger | None, failed: bool) -> None:
    """Flush ``logger``; for W&B finish the run so that the next job (Hydra multirun) starts its own."""
    if logger is None:
        return
    logger.finalize("failed" if failed else "success")
    logger.save()
    if is_wandb(logger):
        import wandb

        wandb.finish(exit_code=1 if failed else 0)


class PhaseLogger(Logger):
    """Forwards one phase's metrics to ``inner`` under ``prefix/`` (none when empty); leaves the run open.

    Hyper-parameters are not forwarded: the app logs the resolved config once.
    """

    def __init__(self, inner: Logger, prefix: str = "") -> None:
        super().__init__()
        self.inner, self.prefix = inner, prefix

    @property
    def name(self) -> str | None:
        return self.inner.name

    @property
    def version(self) -> int | str | None:
        return self.inner.version

    @property
    def save_dir(self) -> str | None:
        return self.inner.save_dir

    @property
    def root_dir(self) -> str | None:
        return getattr(self.inner, "root_dir", None)

    @property
    def log_dir(self) -> str | None:
        return getattr(self.inner, "log_dir", None)

    @property
    def experiment(self) -> Any:
        return self.inner.experiment

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.prefix:
            metrics = {f"{self.prefix}/{key}": value for key, value in metrics.items()}
        self.inner.log_metrics(metrics, step)

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        return None

    def save(self) -> None:
        self.inner.save()

    def finalize(self, status: str) -> None:
        self.inner.save()
