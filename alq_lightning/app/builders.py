"""Objects of one run built from the composed config: data module, network, ALQ callback, Trainer arguments."""
from __future__ import annotations

import inspect
from typing import Any

import lightning as L
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig
from torch import nn

from alq_lightning.app.common import ConfigError, to_container
from alq_lightning.app.loggers import PhaseLogger
from alq_lightning.callbacks import ALQCallback
from alq_lightning.data import build_datamodule
from alq_lightning.models import PAPER_MAX_BITS, build_model, paper_structures

MODEL_PREFIX = "model."
APP_ONLY_ALQ_KEYS = ("float_lr",)
APP_TRAINER_KEYS = ("max_epochs", "min_epochs", "max_steps", "logger", "callbacks", "default_root_dir")


def build_data(cfg: DictConfig) -> LightningDataModule:
    """The data module ``cfg.name`` constructed with the other keys of ``cfg`` (the ``data`` group)."""
    kwargs = to_container(cfg)
    name = kwargs.pop("name")
    try:
        return build_datamodule(name, **kwargs)
    except TypeError as err:
        raise ConfigError(f"data={name}: {err}; remove or fix the offending data.* key") from err


def model_architecture(cfg: DictConfig, datamodule: LightningDataModule) -> dict[str, Any]:
    """``build_model`` arguments of the ``model`` group shaped for the data: ``name``, ``in_channels``,
    ``num_classes``, ``input_size`` and the group's other keys (constructor options such as ``width``)."""
    kwargs = to_container(cfg)
    return {"name": kwargs.pop("name"), "in_channels": datamodule.in_channels,
            "num_classes": datamodule.num_classes, "input_size": datamodule.input_size, **kwargs}


def build_network(cfg: DictConfig, datamodule: LightningDataModule) -> nn.Module:
    """Model ``cfg.name`` (the ``model`` group) shaped for the data (:func:`model_architecture`)."""
    architecture = model_architecture(cfg, datamodule)
    try:
        return build_model(**architecture)
    except TypeError as err:
        raise ConfigError(f"model={architecture['name']}: {err}; remove or fix the offending model.* key") from err
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err


def alq_arguments(cfg: DictConfig, model_name: str, network: nn.Module) -> dict[str, Any]:
    """``ALQCallback`` keyword arguments from the ``alq`` group for a ``ClassifierModule`` around ``network``.

    ``structures: paper`` becomes the model's preset with keys prefixed ``"model."``; ``max_bits: null``
    becomes the preset's max_bits; app-only keys are dropped; unknown keys raise :class:`ConfigError`.
    """
    kwargs = {k: v for k, v in to_container(cfg).items() if k not in APP_ONLY_ALQ_KEYS}
    allowed = set(inspect.signature(ALQCallback).parameters) - {"start_epoch"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(f"alq.{unknown[0]} is not an ALQCallback argument; allowed: {', '.join(sorted(allowed))}")
    if kwargs.get("max_bits") is None:
        kwargs["max_bits"] = PAPER_MAX_BITS[model_name]
    structures = kwargs.get("structures")
    if structures == "paper":
        kwargs["structures"] = {MODEL_PREFIX + k: v for k, v in paper_structures(model_name, network).items()}
    elif structures is not None and not isinstance(structures, dict):
        raise ConfigError(f"alq.structures={structures!r} must be 'paper', null or a mapping {{pattern: structure}}")
    return kwargs


def build_alq_callback(cfg: DictConfig, model_name: str, network: nn.Module) -> ALQCallback:
    """The ``ALQCallback`` of the ``alq`` group; bad values fail here, before any training."""
    kwargs = alq_arguments(cfg, model_name, network)
    try:
        return ALQCallback(**kwargs)
    except ValueError as err:
        origin = "alq.max_bits" if cfg.get("max_bits") is not None else f"the {model_name} preset (alq.max_bits: null)"
        raise ConfigError(f"alq: {err}; model={model_name}, max_bits from {origin}") from err


def float_lr(cfg: DictConfig) -> float:
    """Adam learning rate of the float parameters during ALQ (``alq.float_lr``, default ``alq.lr``)."""
    return float(cfg.float_lr if cfg.get("float_lr") is not None else cfg.lr)


def trainer_arguments(cfg: DictConfig) -> dict[str, Any]:
    """``lightning.Trainer`` keyword arguments of the ``trainer`` group, minus what the app sets itself."""
    kwargs = to_container(cfg)
    taken = sorted(set(kwargs) & set(APP_TRAINER_KEYS))
    if taken:
        raise ConfigError(
            f"trainer.{taken[0]} is set by the app (pretraining runs pretrain.epochs, ALQ the schedule's "
            "total_epochs); remove it and change pretrain.* or alq.* instead"
        )
    return kwargs


def progress_bar(enabled: bool) -> list[Callback]:
    """A Rich progress bar (the TQDM one when ``rich`` is missing), or none when disabled."""
    if not enabled:
        return []
    try:
        from lightning.pytorch.callbacks import RichProgressBar

        return [RichProgressBar()]
    except (ImportError, ModuleNotFoundError):
        from lightning.pytorch.callbacks import TQDMProgressBar

        return [TQDMProgressBar()]


def make_trainer(cfg: DictConfig, logger: Logger | None, prefix: str, max_epochs: int,
                 callbacks: list[Callback] | None = None, checkpointing: bool | None = None) -> L.Trainer:
    """A Trainer of the ``trainer`` group for one phase, logging under ``prefix/`` into the run's ``logger``."""
    kwargs = trainer_arguments(cfg.trainer)
    if checkpointing is not None:
        kwargs["enable_checkpointing"] = checkpointing
    bar = progress_bar(kwargs.get("enable_progress_bar", True))
    return L.Trainer(max_epochs=max_epochs, logger=PhaseLogger(logger, prefix) if logger is not None else False,
                     callbacks=[*(callbacks or []), *bar], default_root_dir=str(cfg.paths.output_dir), **kwargs)
