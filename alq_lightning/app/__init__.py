"""Helpers of the Hydra app (:mod:`alq_lightning.app.train`, run by ``train.py`` and ``alq-train``): building
objects from the config with ``hydra.utils.instantiate``, float pretraining and its cache, loggers (W&B with offline
and CSV fallbacks), recorders, results.json, plots, extras."""
from alq_lightning.app.builders import (
    Model,
    alq_arguments,
    build_alq_callback,
    build_callbacks,
    build_data,
    build_module,
    data_shape,
    fill_from_data,
    make_trainer,
    pretrain_module,
    trainer_arguments,
)
from alq_lightning.app.common import ConfigError, instantiate, to_container
from alq_lightning.app.console import JobPlan, RunProgress, phase, route_logging
from alq_lightning.app.contract import MetricContract, check_test_step
from alq_lightning.app.extras import apply_extras, config_tree, print_config
from alq_lightning.app.loggers import PhaseLogger, build_loggers, finish_loggers, resolve_wandb_mode
from alq_lightning.app.pretrain import cache_key, cache_path, load_checkpoint, obtain_float_weights, read_state_dict
from alq_lightning.app.recorders import ALQRecorder, StageClock
from alq_lightning.app.report import log_packed_model, packed_model_metadata, publish, save_plots
from alq_lightning.app.results import (
    REQUIRED_KEYS,
    ExportError,
    git_commit,
    hardware,
    summarize_bits,
    write_results,
    write_results_then_export,
)

__all__ = [
    "ALQRecorder", "ConfigError", "ExportError", "JobPlan", "MetricContract", "Model", "PhaseLogger", "REQUIRED_KEYS",
    "RunProgress", "StageClock", "alq_arguments", "apply_extras", "build_alq_callback", "build_callbacks",
    "build_data", "build_loggers", "build_module", "cache_key", "cache_path", "check_test_step", "config_tree",
    "data_shape", "fill_from_data", "finish_loggers", "git_commit", "hardware", "instantiate", "load_checkpoint",
    "log_packed_model", "make_trainer", "obtain_float_weights", "packed_model_metadata", "phase", "pretrain_module",
    "print_config", "publish", "read_state_dict", "resolve_wandb_mode", "route_logging", "save_plots",
    "summarize_bits", "to_container", "trainer_arguments", "write_results", "write_results_then_export",
]
