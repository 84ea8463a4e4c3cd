"""Run-wide extras of the ``extras`` group: print the resolved config, silence warnings, require tags."""
from __future__ import annotations

import warnings

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from alq_lightning.app.common import ConfigError

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


@rank_zero_only
def print_config(cfg: DictConfig) -> None:
    import rich

    rich.print(config_tree(cfg))


def apply_extras(cfg: DictConfig) -> None:
    """``extras.enforce_tags`` (a run without ``tags`` is refused), ``extras.ignore_warnings`` and
    ``extras.print_config``; nothing without an ``extras`` group."""
    extras = cfg.get("extras") or {}
    if extras.get("enforce_tags") and not cfg.get("tags"):
        raise ConfigError("tags=[] while extras.enforce_tags=true: name the run's tags, e.g. tags=[lenet5,baseline], "
                          "or set extras.enforce_tags=false")
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        print_config(cfg)
