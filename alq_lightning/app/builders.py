"""Objects of one run built from the composed config with ``hydra.utils.instantiate``: data module, LightningModule
(and its network), ALQ callback, Lightning callbacks and Trainers."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import hydra
import lightning as L
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.callbacks import Checkpoint, ModelSummary, ProgressBar
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from alq_lightning.app.common import TARGET, ConfigError, instantiate, target_of, to_container
from alq_lightning.app.loggers import PhaseLogger
from alq_lightning.callbacks import ALQCallback
from alq_lightning.models import PAPER_MAX_BITS, model_name, paper_structures

DATA_SHAPE_KEYS = ("in_channels", "num_classes", "input_size")
APP_TRAINER_KEYS = ("max_epochs", "min_epochs", "max_steps", "logger", "callbacks", "default_root_dir")


def build_data(cfg: DictConfig) -> LightningDataModule:
    """The data module of the ``data`` group."""
    datamodule = instantiate(cfg, "data")
    if not isinstance(datamodule, LightningDataModule):
        raise ConfigError(f"data._target_={cfg[TARGET]!r} built a {type(datamodule).__name__}, not a "
                          "LightningDataModule")
    return datamodule


def data_shape(datamodule: LightningDataModule) -> dict[str, int]:
    """The data module's ``in_channels``, ``num_classes`` and ``input_size`` (those it has)."""
    return {key: getattr(datamodule, key) for key in DATA_SHAPE_KEYS if hasattr(datamodule, key)}


def fill_from_data(cfg: DictConfig, shape: dict[str, int], group: str = "model") -> DictConfig:
    """A copy of ``cfg`` whose missing values (``???``) named like a data-shape key (``in_channels``,
    ``num_classes``, ``input_size``), at any depth, hold the data module's values."""
    filled = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))

    def fill(node: DictConfig, path: str) -> None:
        for key in list(node.keys()):
            if OmegaConf.is_missing(node, key) and key in DATA_SHAPE_KEYS:
                if key not in shape:
                    raise ConfigError(f"{path}{key}=??? is filled from the data module, which has no {key}")
                node[key] = shape[key]
            elif isinstance(node._get_node(key), DictConfig):
                fill(node[key], f"{path}{key}.")

    fill(filled, f"{group}.")
    return filled


@dataclass
class Model:
    """The LightningModule of the ``model`` group, the network ALQ exports (its ``net`` when it has one, else the
    module), that network's name in the package's zoo (None for a user's network), its attribute path in the
    module with a dot (``"model."``; empty for the module itself) and the config with the data's values filled."""

    module: LightningModule
    network: nn.Module
    name: str | None
    prefix: str
    config: DictConfig

    def rebuilt(self, **kwargs: Any) -> LightningModule:
        """A second module of the same config around the same network with ``kwargs`` replaced."""
        return instantiate(self.config, "model", net=self.network, **kwargs)


def accepts(target: Any, *names: str) -> bool:
    """Whether calling ``target`` takes every keyword in ``names``."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return all(name in parameters for name in names)


def architecture(net_cfg: DictConfig, name: str | None, shape: dict[str, int]) -> dict[str, Any] | None:
    """``build_model`` arguments of a network of the package (``name``, the data shape, the constructor's other
    arguments); None for a user's network."""
    if name is None:
        return None
    options = {k: v for k, v in to_container(net_cfg).items() if k != TARGET}
    return {"name": name, **{k: shape[k] for k in DATA_SHAPE_KEYS if k in shape}, **options}


def build_module(cfg: DictConfig, datamodule: LightningDataModule) -> Model:
    """The LightningModule of the ``model`` group, its ``???`` data-shape values filled from ``datamodule``.

    With a ``net`` node, the network is built first and passed in (the module holds it), so that its class names
    the paper preset and a second module around it can pretrain it; ``architecture: ???`` becomes its
    ``build_model`` arguments (None for a network outside the package).
    """
    shape = data_shape(datamodule)
    cfg = fill_from_data(cfg, shape)
    target_of(cfg, "model")
    if "net" in cfg and OmegaConf.is_dict(cfg.net):
        factory = target_of(cfg.net, "model.net")
        name = model_name(factory)
        if OmegaConf.is_missing(cfg, "architecture"):
            cfg.architecture = architecture(cfg.net, name, shape)
        network = instantiate(cfg.net, "model.net")
        module = instantiate(cfg, "model", net=network)
    else:
        module = instantiate(cfg, "model")
        network, name = module, None
    if not isinstance(module, LightningModule):
        raise ConfigError(f"model._target_={cfg[TARGET]!r} built a {type(module).__name__}, not a LightningModule")
    prefix = next((n for n, m in module.named_modules() if m is network), "")
    return Model(module, network, name, f"{prefix}." if prefix else "", cfg)


def pretrain_module(cfg: DictConfig, model: Model) -> LightningModule:
    """The module float pretraining trains: the ``model`` group's module with ``pretrain.optimizer`` and
    ``pretrain.scheduler`` when its class takes ``net``, ``optimizer`` and ``scheduler``; else the module itself
    (its own ``configure_optimizers``)."""
    if cfg.pretrain.get("optimizer") is None or not accepts(target_of(model.config, "model"), "net", "optimizer",
                                                              "scheduler"):
        return model.module
    return model.rebuilt(optimizer=instantiate(cfg.pretrain.optimizer, "pretrain.optimizer"),
                         scheduler=instantiate(cfg.pretrain.get("scheduler"), "pretrain.scheduler"))


def alq_arguments(cfg: DictConfig, model: Model) -> dict[str, Any]:
    """``ALQCallback`` keyword arguments of the ``alq`` group for ``model``.

    ``structures: paper`` becomes the network's preset, its keys prefixed with the network's name in the module;
    ``max_bits: null`` becomes the preset's max_bits; unknown keys raise :class:`ConfigError`.
    """
    kwargs = {k: v for k, v in to_container(cfg).items() if k != TARGET}
    allowed = set(inspect.signature(target_of(cfg, "alq")).parameters) - {"start_epoch"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(f"alq.{unknown[0]} is not an ALQCallback argument; allowed: {', '.join(sorted(allowed))}")
    preset_needed = kwargs.get("max_bits") is None or kwargs.get("structures") == "paper"
    if preset_needed and model.name is None:
        raise ConfigError(
            f"alq.max_bits=null and alq.structures=paper take the paper's preset of the package's networks; "
            f"{type(model.network).__name__} is not one of them: set alq.max_bits and alq.structures "
            "(null = automatic, or a mapping {pattern: structure})"
        )
    if kwargs.get("max_bits") is None:
        kwargs["max_bits"] = PAPER_MAX_BITS[model.name]
    structures = kwargs.get("structures")
    if structures == "paper":
        kwargs["structures"] = {model.prefix + k: v for k, v in paper_structures(model.name, model.network).items()}
    elif structures is not None and not isinstance(structures, dict):
        raise ConfigError(f"alq.structures={structures!r} must be 'paper', null or a mapping {{pattern: structure}}")
    return kwargs


def build_alq_callback(cfg: DictConfig, model: Model) -> ALQCallback:
    """The ALQ callback of the ``alq`` group; bad values fail here, before any training."""
    kwargs = alq_arguments(cfg, model)
    try:
        return hydra.utils.instantiate({TARGET: cfg[TARGET]}, **kwargs)
    except Exception as err:
        cause = err.__cause__ or err
        if not isinstance(cause, ValueError):
            raise ConfigError(f"alq: {type(cause).__name__}: {cause}") from err
        origin = "alq.max_bits" if cfg.get("max_bits") is not None else f"the {model.name} preset (alq.max_bits: null)"
        raise ConfigError(f"alq: {cause}; model={model.name or type(model.network).__name__}, max_bits from "
                          f"{origin}") from err


def trainer_arguments(cfg: DictConfig) -> dict[str, Any]:
    """The ``trainer`` group's keyword arguments (``_target_`` aside), minus what the app sets itself."""
    kwargs = {k: v for k, v in to_container(cfg).items() if k != TARGET}
    taken = sorted(set(kwargs) & set(APP_TRAINER_KEYS))
    if taken:
        raise ConfigError(
            f"trainer.{taken[0]} is set by the app (pretraining runs pretrain.epochs, ALQ the schedule's "
            "total_epochs; callbacks come from the callbacks group); remove it and change pretrain.*, alq.* or "
            "callbacks.* instead"
        )
    return kwargs


def build_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """The Lightning callbacks of the ``callbacks`` group (a mapping of name to ``_target_`` config)."""
    built = []
    for key, node in (cfg or {}).items():
        if node is None:
            continue
        callback = instantiate(node, f"callbacks.{key}")
        if not isinstance(callback, Callback):
            raise ConfigError(f"callbacks.{key} built a {type(callback).__name__}, not a lightning Callback")
        built.append(callback)
    return built


def make_trainer(cfg: DictConfig, loggers: list[Logger], prefix: str, max_epochs: int,
                 callbacks: list[Callback] | None = None, checkpointing: bool = False) -> L.Trainer:
    """A Trainer of the ``trainer`` group for one phase with the ``callbacks`` group's callbacks (its checkpoint
    only when ``checkpointing``; progress bars and summaries only when the trainer enables them), logging under
    ``prefix/`` into the run's ``loggers``."""
    kwargs = trainer_arguments(cfg.trainer)
    extra = build_callbacks(cfg.get("callbacks"))
    switches = ((Checkpoint, checkpointing and kwargs.get("enable_checkpointing", True)),
                (ProgressBar, kwargs.get("enable_progress_bar", True)),
                (ModelSummary, kwargs.get("enable_model_summary", True)))
    extra = [c for c in extra if all(on or not isinstance(c, kind) for kind, on in switches)]
    factory = instantiate(cfg.trainer, "trainer", _partial_=True)
    summary = any(isinstance(c, ModelSummary) for c in extra)  # then Lightning adds none (and says so unless off)
    return factory(max_epochs=max_epochs, logger=[PhaseLogger(logger, prefix) for logger in loggers] or False,
                   callbacks=[*(callbacks or []), *extra], default_root_dir=str(cfg.paths.output_dir),
                   enable_checkpointing=any(isinstance(c, Checkpoint) for c in extra),
                   **({"enable_model_summary": False} if summary else {}))
