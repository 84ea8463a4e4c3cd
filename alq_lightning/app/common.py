"""Small pieces shared by the app's modules."""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names the key, the value and what is allowed."""


def to_container(cfg: Any) -> Any:
    """Plain Python containers of a (possibly nested) OmegaConf node, interpolations resolved."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
