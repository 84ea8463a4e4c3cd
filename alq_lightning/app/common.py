"""Small pieces shared by the app's modules."""
from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

TARGET = "_target_"


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names the key, the value and what is allowed."""


def to_container(cfg: Any) -> Any:
    """Plain Python containers of a (possibly nested) OmegaConf node, interpolations resolved."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def instantiate(cfg: Any, group: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(cfg, **kwargs)``; a failure becomes a :class:`ConfigError` naming ``group``."""
    try:
        return hydra.utils.instantiate(cfg, _convert_="all", **kwargs)
    except Exception as err:  # InstantiationException, missing values, the target's own ValueError/TypeError
        cause = err.__cause__ or err
        raise ConfigError(f"{group}: {type(cause).__name__}: {cause}") from err


def target_of(cfg: DictConfig, group: str) -> Any:
    """The class or function named by ``cfg._target_``."""
    if TARGET not in cfg:
        raise ConfigError(f"{group} has no _target_; it must name the class to build, e.g. "
                          f"{group}._target_=my_package.MyClass")
    try:
        return hydra.utils.get_object(str(cfg[TARGET]))
    except Exception as err:
        raise ConfigError(f"{group}._target_={cfg[TARGET]!r} cannot be imported: {err}") from err
