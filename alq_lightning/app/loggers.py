"""Metric loggers of the app, built from the ``logger`` group: W&B (offline without an API key, CSV when W&B
cannot start), CSV, both, or none."""
from __future__ import annotations

import logging
import netrc
import os
import warnings
from argparse import Namespace
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from alq_lightning.app.common import ConfigError, instantiate, target_of, to_container

WANDB_MODES = ("online", "offline", "disabled")
log = logging.getLogger("alq_lightning.app")


def has_wandb_key() -> bool:
    """Whether W&B can authenticate: ``WANDB_API_KEY`` or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str, say: bool = True) -> str:
    """``WANDB_MODE`` when set, else ``mode``; ``online`` becomes ``offline`` without an API key (logged when
    ``say``)."""
    chosen = os.environ.get("WANDB_MODE") or mode
    if chosen == "dryrun":
        chosen = "offline"
    if chosen not in WANDB_MODES:
        raise ConfigError(f"logger.wandb.mode={chosen!r} (or WANDB_MODE) is not allowed; "
                          f"allowed: {', '.join(WANDB_MODES)}")
    if chosen == "online" and not has_wandb_key():  # the documented default without a key: said, not warned
        if say:
            log.info("W&B: no API key (WANDB_API_KEY or `wandb login`), so logging offline into the run folder; "
                     "`wandb sync` uploads it later")
        return "offline"
    return chosen


APP_LOGGER_KEYS = ("log_packed_model",)


def is_wandb(logger: Logger | None) -> bool:
    return type(logger).__name__ == "WandbLogger"


BITS_AXES = {"alq/*": "alq/avg_bits", "final/*": "final/avg_bits"}


def define_bits_axes(run: Any) -> None:
    """Let W&B charts plot the ALQ metrics logged at each epoch's end (``alq/*``: bytes, per-layer bits, round,
    learning rate) against ``alq/avg_bits``, and the final ones (``final/*``: accuracies, bytes) against
    ``final/avg_bits``, which are logged in the same calls."""
    for pattern, axis in BITS_AXES.items():
        run.define_metric(axis)
        run.define_metric(pattern, step_metric=axis)


def build_one(key: str, node: DictConfig) -> Logger:
    """Logger ``logger.<key>``; a ``WandbLogger`` gets its mode resolved (:func:`resolve_wandb_mode`) and is
    started at once, so that a W&B failure shows here."""
    resolved = to_container(node)
    options = {k: resolved.pop(k) for k in APP_LOGGER_KEYS if k in resolved}
    node = OmegaConf.create(resolved)
    kwargs: dict[str, Any] = {}
    if target_of(node, f"logger.{key}").__name__ == "WandbLogger":
        kwargs["mode"] = resolve_wandb_mode(node.get("mode") or "online")
        if node.get("settings") is None:  # W&B's own switch for its non-essential output (version line, tips)
            import wandb

            kwargs["settings"] = wandb.Settings(quiet=True)
        if node.get("save_dir"):
            os.makedirs(str(node.save_dir), exist_ok=True)
    logger = instantiate(node, f"logger.{key}", **kwargs)
    if not isinstance(logger, Logger):
        raise ConfigError(f"logger.{key} built a {type(logger).__name__}, not a lightning Logger")
    if is_wandb(logger):
        # Lightning passes anonymous=None to wandb.init, which W&B (0.2x on) warns about on every run though the
        # setting has no effect; not passing it changes nothing else.
        getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        define_bits_axes(logger.experiment)  # starts the run now, so that a failure falls back to CSV
    logger._app_options = options
    return logger


def build_loggers(cfg: DictConfig | None, config: dict[str, Any]) -> list[Logger]:
    """The loggers of the ``logger`` group (a mapping of name to ``_target_`` config; empty for ``logger=none``),
    each with the resolved run ``config`` logged. W&B that cannot start is replaced by a CSV logger in its
    ``save_dir`` (unless a CSV logger is configured already)."""
    loggers: list[Logger] = []
    fallback: str | None = None
    for key, node in (cfg or {}).items():
        if node is None:
            continue
        try:
            loggers.append(build_one(key, node))
        except ConfigError:
            raise
        except Exception as err:  # W&B failures come in many types; any of them falls back to CSV
            warnings.warn(f"W&B is unavailable ({type(err).__name__}: {err}); logging to CSV instead", stacklevel=2)
            fallback = str(node.get("save_dir") or ".")
    if fallback is not None and not any(isinstance(logger, CSVLogger) for logger in loggers):
        loggers.append(CSVLogger(save_dir=fallback, name="csv"))
    for logger in loggers:
        logger.log_hyperparams(config)
    return loggers


def finish_loggers(loggers: list[Logger], failed: bool) -> None:
    """Flush ``loggers``; for W&B finish the run so that the next job (Hydra multirun) starts its own."""
    for logger in loggers:
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
