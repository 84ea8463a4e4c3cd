"""Helpers of the Hydra app (:mod:`alq_lightning.app.train`, run by ``train.py`` and ``alq-train``): building
objects from the config, float pretraining and its cache, loggers (W&B with offline and CSV fallbacks), recorders,
results.json, plots."""
from alq_lightning.app.builders import (
    alq_arguments,
    build_alq_callback,
    build_data,
    build_network,
    float_lr,
    make_trainer,
    model_architecture,
    progress_bar,
    trainer_arguments,
)
from alq_lightning.app.common import ConfigError, to_container
from alq_lightning.app.loggers import PhaseLogger, build_logger, finish_logger, resolve_wandb_mode
from alq_lightning.app.pretrain import cache_key, cache_path, load_checkpoint, obtain_float_weights, read_state_dict
from alq_lightning.app.recorders import ALQRecorder, StageClock
from alq_lightning.app.report import publish, save_plots
from alq_lightning.app.results import REQUIRED_KEYS, git_commit, hardware, summarize_bits, write_results

__all__ = [
    "ALQRecorder", "ConfigError", "PhaseLogger", "REQUIRED_KEYS", "StageClock", "alq_arguments",
    "build_alq_callback", "build_data", "build_logger", "build_network", "cache_key", "cache_path",
    "finish_logger", "float_lr", "git_commit", "hardware", "load_checkpoint", "make_trainer", "model_architecture",
    "obtain_float_weights", "progress_bar", "publish", "read_state_dict", "resolve_wandb_mode", "save_plots",
    "summarize_bits", "to_container", "trainer_arguments", "write_results",
]
