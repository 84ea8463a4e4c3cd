"""Every option of every config group composes, and its data module / model / logger / callbacks can be built with
hydra.utils.instantiate; sweeps optimise a validation metric and live outside the Hydra search path."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from alq_lightning.app import (
    ConfigError,
    build_alq_callback,
    build_callbacks,
    build_data,
    build_loggers,
    build_module,
    finish_loggers,
    make_trainer,
    trainer_arguments,
)
from alq_lightning.data import DataNotFoundError, FashionMNISTDataModule
from alq_lightning.models import LeNet5
from alq_lightning.module import ClassifierModule

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
GROUPS = ("data", "model", "alq", "callbacks", "trainer", "logger", "paths", "extras", "experiment")
SWEEPS = ROOT / "bench" / "sweeps"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={tmp_path}", *overrides])


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("ALQ_CACHE", str(tmp_path / "cache"))


def test_every_group_has_its_options():
    assert set(options("data")) == {"fashion_mnist", "mnist", "cifar10", "imagenet", "synthetic"}
    assert set(options("model")) == {"lenet5", "vgg_small", "resnet20", "resnet18", "resnet34", "vit_tiny"}
    assert set(options("trainer")) == {"cpu", "gpu", "ddp", "fsdp2"}
    assert set(options("logger")) == {"wandb", "csv", "many_loggers", "none"}
    assert set(options("alq")) == {"default", "paper"}
    assert {"default", "none", "model_checkpoint"} <= set(options("callbacks"))
    assert {"smoke", "fmnist_lenet5", "fmnist_lenet5_protocol", "fmnist_vgg_small", "fmnist_vit_tiny", "mnist_lenet5",
            "cifar10_vgg_small", "imagenet_resnet18"} <= set(options("experiment"))
    assert set(options("hparams_search")) == {"optuna_lr"}


def test_every_group_but_alq_names_targets():
    cfg = compose_with(["logger=many_loggers"], Path("/tmp"))
    assert cfg.data._target_ == "alq_lightning.data.FashionMNISTDataModule"
    assert cfg.model._target_ == "alq_lightning.module.ClassifierModule"
    assert cfg.model.net._target_ == "alq_lightning.models.LeNet5"
    assert cfg.trainer._target_ == "lightning.Trainer"
    assert cfg.alq._target_ == "alq_lightning.ALQCallback"
    assert {k: v._target_.rsplit(".", 1)[1] for k, v in cfg.logger.items()} == {"wandb": "WandbLogger",
                                                                              "csv": "CSVLogger"}
    assert cfg.callbacks.model_checkpoint._target_.endswith("ModelCheckpoint")
    assert cfg.pretrain.optimizer._partial_ and cfg.model.optimizer._partial_


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose_with([f"{group}={option}"], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["pretrain"]["cache_dir"] == str(tmp_path / "cache" / "pretrained")
    if group == "experiment":
        assert cfg.alq.target_bits > 0
        trainer_arguments(cfg.trainer)


def test_vit_tiny_experiment_quantizes_every_matrix_at_one_bit(tmp_path):
    cfg = compose_with(["experiment=fmnist_vit_tiny"], tmp_path)
    assert (cfg.model.net._target_, cfg.data._target_, cfg.alq.target_bits) == (
        "alq_lightning.models.ViTTiny", "alq_lightning.data.FashionMNISTDataModule", 1)
    assert list(cfg.alq.include) == ["*"] and not cfg.alq.exclude and not cfg.alq.keep_first and not cfg.alq.keep_last
    model = build_module(cfg.model, build_data(cfg.data))
    assert model.network.position_embedding.shape == (17, 64) and model.name == "vit_tiny"
    callback = build_alq_callback(cfg.alq, model)
    assert callback.init.selection.max_bits == cfg.alq.max_bits


def test_default_job_is_the_base_config_and_fmnist_lenet5(tmp_path):
    cfg = compose_with([], tmp_path)
    assert (cfg.model.net._target_, cfg.data._target_) == ("alq_lightning.models.LeNet5",
                                                           "alq_lightning.data.FashionMNISTDataModule")
    assert cfg.alq.target_bits <= 0.7 and cfg.pretrain.epochs <= 5
    named = compose_with(["experiment=fmnist_lenet5"], tmp_path)
    assert OmegaConf.to_container(named, resolve=True) == OmegaConf.to_container(cfg, resolve=True)


def test_paper_schedule_is_a_named_alq_preset(tmp_path):
    cfg = compose_with(["alq=paper"], tmp_path)
    model = build_module(cfg.model, build_data(cfg.data))
    assert build_alq_callback(cfg.alq, model).total_epochs == 225
    assert cfg.alq.target_bits == compose_with([], tmp_path).alq.target_bits


@pytest.mark.parametrize("model", options("model"))
def test_models_build_and_take_the_paper_preset(model, tmp_path):
    cfg = compose_with([f"model={model}", "data=synthetic", "data.input_size=32"], tmp_path)
    built = build_module(cfg.model, build_data(cfg.data))
    assert isinstance(built.module, ClassifierModule) and built.module.model is built.network
    assert built.module.hparams.architecture["name"] == model == built.name
    assert built.module.hparams.architecture["input_size"] == 32
    callback = build_alq_callback(cfg.alq, built)
    assert callback.init.selection.max_bits == (8 if model in ("resnet18", "resnet34") else 6)
    assert all(key.startswith("model.") for key in callback.init.selection.structures)


@pytest.mark.parametrize("data", ["fashion_mnist", "synthetic"])
def test_local_data_sets_load(data, tmp_path):
    cfg = compose_with([f"data={data}", "data.train_limit=64", "data.batch_size=32"], tmp_path)
    datamodule = build_data(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape[1:] == (datamodule.in_channels, datamodule.input_size, datamodule.input_size)


@pytest.mark.parametrize("data", ["fashion_mnist", "mnist", "cifar10"])
@pytest.mark.parametrize("download", ["true", "false"])
def test_data_root_that_cannot_serve_is_an_error(data, download, tmp_path):
    cfg = compose_with([f"data={data}", f"data.root={tmp_path / 'none'}", f"data.download={download}"], tmp_path)
    datamodule = build_data(cfg.data)
    with pytest.raises(DataNotFoundError, match=f"data root {tmp_path / 'none'} cannot serve; root=.* does not exist"):
        datamodule.prepare_data()


def test_imagenet_without_files_fails_clearly(tmp_path):
    cfg = compose_with(["data=imagenet", f"data.root={tmp_path / 'none'}"], tmp_path)
    datamodule = build_data(cfg.data)
    assert (datamodule.in_channels, datamodule.input_size, datamodule.num_classes) == (3, 224, 1000)
    with pytest.raises((DataNotFoundError, ImportError), match="torchvision|data.root="):
        datamodule.setup("fit")


def test_data_dir_is_the_data_root(tmp_path):
    assert compose_with([], tmp_path).data.root is None  # each data module's own search
    cfg = compose_with([f"paths.data_dir={tmp_path / 'data'}"], tmp_path)
    datamodule = build_data(cfg.data)
    assert isinstance(datamodule, FashionMNISTDataModule) and str(datamodule.root) == str(tmp_path / "data")


@pytest.mark.parametrize("logger", options("logger"))
def test_loggers_build(logger, tmp_path):
    cfg = compose_with([f"logger={logger}", "tags=[a,b]"], tmp_path)
    built = build_loggers(cfg.logger, {"seed": 0})
    try:
        names = sorted(type(b).__name__ for b in built)
        assert names == {"none": [], "csv": ["CSVLogger"], "wandb": ["WandbLogger"],
                         "many_loggers": ["CSVLogger", "WandbLogger"]}[logger]
        if "WandbLogger" in names:
            (run,) = (tmp_path / "wandb").glob("offline-run-*")
            wandb_logger = next(b for b in built if type(b).__name__ == "WandbLogger")
            assert list(wandb_logger.experiment.tags) == ["a", "b"]
    finally:
        finish_loggers(built, failed=False)


@pytest.mark.parametrize("callbacks,expected", [
    ("default", {"ModelCheckpoint", "RichProgressBar", "RichModelSummary"}),
    ("none", set()),
])
def test_callbacks_build(callbacks, expected, tmp_path):
    cfg = compose_with([f"callbacks={callbacks}"], tmp_path)
    assert {type(c).__name__ for c in build_callbacks(cfg.callbacks)} == expected
    trainer = make_trainer(cfg, [], "", 1, checkpointing=True)
    assert (trainer.checkpoint_callback is not None) == (callbacks == "default")
    if callbacks == "default":
        assert trainer.checkpoint_callback.dirpath == str(tmp_path) and trainer.checkpoint_callback.filename == "last"
    quiet = make_trainer(compose_with([f"callbacks={callbacks}", "trainer.enable_progress_bar=false",
                                       "trainer.enable_model_summary=false"], tmp_path), [], "pretrain", 1)
    assert quiet.checkpoint_callback is None and quiet.progress_bar_callback is None


def test_unknown_group_option_is_refused(tmp_path):
    with pytest.raises(MissingConfigException, match="model"):
        compose_with(["model=alexnet"], tmp_path)


def test_unknown_model_target_is_refused(tmp_path):
    cfg = compose_with(["model.net._target_=alq_lightning.models.AlexNet"], tmp_path)
    with pytest.raises(ConfigError, match=r"model.net._target_='alq_lightning.models.AlexNet' cannot be imported"):
        build_module(cfg.model, build_data(cfg.data))


def test_network_shape_comes_from_the_data(tmp_path):
    cfg = compose_with(["data=synthetic", "data.in_channels=2", "data.input_size=16", "data.num_classes=4"], tmp_path)
    assert OmegaConf.is_missing(cfg.model.net, "in_channels")
    built = build_module(cfg.model, build_data(cfg.data))
    assert isinstance(built.network, LeNet5) and built.network(torch.zeros(1, 2, 16, 16)).shape == (1, 4)
    assert built.module.hparams.architecture == {"name": "lenet5", "in_channels": 2, "num_classes": 4,
                                                 "input_size": 16}


def test_trainer_max_epochs_is_refused(tmp_path):
    cfg = compose_with(["+trainer.max_epochs=3"], tmp_path)
    with pytest.raises(ConfigError, match="trainer.max_epochs is set by the app"):
        trainer_arguments(cfg.trainer)


@pytest.mark.parametrize("name", ["target_bits", "bayes_lr"])
def test_wandb_sweeps_are_valid(name):
    sweep = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())
    assert sweep["program"] == "train.py"
    assert sweep["command"] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
    assert sweep["metric"] == {"name": "val/acc", "goal": "maximize"}
    assert sweep["metric"]["name"].startswith("val/")
    assert sweep["method"] == {"target_bits": "grid", "bayes_lr": "bayes"}[name]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config")
    for key in sweep["parameters"]:
        assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None, key


def test_help_lists_no_sweeps_group():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    groups = done.stdout[done.stdout.index("== Configuration groups =="):done.stdout.index("== Config ==")]
    assert "sweeps" not in groups and "hparams_search: optuna_lr" in groups
    assert "callbacks: default, model_checkpoint, none" in groups
    assert not [p for p in CONF.rglob("*") if p.is_dir() and "sweep" in p.name]


def test_optuna_preset_maximises_a_validation_metric():
    preset = yaml.safe_load((CONF / "hparams_search" / "optuna_lr.yaml").read_text())
    assert preset["optimized_metric"].startswith("val/")
    assert preset["hydra"]["sweeper"]["direction"] == "maximize"
    assert compose_with([], Path("/tmp")).optimized_metric == "val/acc"


def has_optuna_sweeper() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ImportError:
        return False


@pytest.mark.skipif(not has_optuna_sweeper(), reason="hydra-optuna-sweeper is not installed")
def test_optuna_sweeper_composes(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna_lr"], return_hydra_config=True)
    assert cfg.hydra.sweeper.direction == "maximize"
