"""Run-wide extras of the ``extras`` group: log the config that runs, silence warnings, require tags."""
from __future__ import annotations

import io
import logging
import warnings
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from alq_lightning.app.common import ConfigError

log = logging.getLogger("alq_lightning.app")

CONFIG_ORDER = ("data", "model", "alq", "pretrain", "callbacks", "trainer", "logger", "paths", "extras")


def config_tree(cfg: DictConfig):
    """The resolved ``cfg`` as a Rich tree: one branch per top-level key (groups first), each holding its YAML."""
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("config", guide_style="dim")
    keys = [*[k for k in CONFIG_ORDER if k in cfg], *[k for k in cfg if k not in CONFIG_ORDER]]
    for key in keys:
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if OmegaConf.is_config(value) else str(value)
        tree.add(str(key)).add(rich.syntax.Syntax(text, "yaml"))
    return tree


def config_text(cfg: DictConfig, filled: dict[str, Any]) -> str:
    """:func:`config_tree` of ``cfg`` with the top-level nodes ``filled`` replaced (the ``model`` group with the
    values the app fills from the data module, instead of ``???``), as plain text."""
    import rich.console

    shown = cfg.copy()
    for key, value in filled.items():
        shown[key] = value
    console = rich.console.Console(file=io.StringIO(), width=120, color_system=None)
    console.print(config_tree(shown))
    return "\n".join(line.rstrip() for line in console.file.getvalue().rstrip().splitlines())


@rank_zero_only
def print_config(cfg: DictConfig, filled: dict[str, Any]) -> None:
    """``extras.print_config``: the config that will run, into the log (console and train.log)."""
    log.info(f"config of this run:\n{config_text(cfg, filled)}")


def apply_extras(cfg: DictConfig) -> None:
    """``extras.enforce_tags`` (a run without ``tags`` is refused) and ``extras.ignore_warnings``; nothing without
    an ``extras`` group. ``extras.print_config`` is :func:`print_config`, once the data module has filled the
    config."""
    extras = cfg.get("extras") or {}
    if extras.get("enforce_tags") and not cfg.get("tags"):
        raise ConfigError("tags=[] while extras.enforce_tags=true: name the run's tags, e.g. tags=[lenet5,baseline], "
                          "or set extras.enforce_tags=false")
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
