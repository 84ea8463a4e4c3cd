"""Every option of every config group composes, and its data module / model / logger can be built."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from alq_lightning.app import (
    ConfigError,
    build_alq_callback,
    build_data,
    build_logger,
    build_network,
    finish_logger,
    trainer_arguments,
)
from alq_lightning.data import DataNotFoundError

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
GROUPS = ("data", "model", "alq", "trainer", "logger", "experiment")


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
    assert set(options("trainer")) == {"cpu", "gpu", "ddp"}
    assert set(options("logger")) == {"wandb", "csv", "none"}
    assert {"smoke", "fmnist_lenet5", "fmnist_lenet5_protocol", "fmnist_vgg_small", "fmnist_vit_tiny", "lenet5_mnist",
            "vgg_small_cifar10", "resnet18_imagenet"} <= set(options("experiment"))


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
    assert (cfg.model.name, cfg.data.name, cfg.alq.target_bits) == ("vit_tiny", "fashion_mnist", 1)
    assert list(cfg.alq.include) == ["*"] and not cfg.alq.exclude and not cfg.alq.keep_first and not cfg.alq.keep_last
    datamodule = build_data(cfg.data)
    network = build_network(cfg.model, datamodule)
    assert network.position_embedding.shape == (17, 64)
    callback = build_alq_callback(cfg.alq, cfg.model.name, network)
    assert callback.init.selection.max_bits == cfg.alq.max_bits


def test_default_job_is_fmnist_lenet5(tmp_path):
    cfg = compose_with([], tmp_path)
    assert (cfg.model.name, cfg.data.name) == ("lenet5", "fashion_mnist")
    assert cfg.alq.target_bits <= 0.7 and cfg.pretrain.epochs <= 5


@pytest.mark.parametrize("model", options("model"))
def test_models_build_and_take_the_paper_preset(model, tmp_path):
    cfg = compose_with([f"model={model}", "data=synthetic", "data.input_size=32"], tmp_path)
    datamodule = build_data(cfg.data)
    network = build_network(cfg.model, datamodule)
    callback = build_alq_callback(cfg.alq, cfg.model.name, network)
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


@pytest.mark.parametrize("logger", options("logger"))
def test_loggers_build(logger, tmp_path):
    cfg = compose_with([f"logger={logger}"], tmp_path)
    built = build_logger(cfg.logger, {"seed": 0})
    try:
        assert (built is None) == (logger == "none")
        if logger == "wandb":
            assert type(built).__name__ == "WandbLogger"
            assert list((tmp_path / "wandb").glob("offline-run-*"))
    finally:
        finish_logger(built, failed=False)


def test_unknown_group_option_is_refused(tmp_path):
    with pytest.raises(MissingConfigException, match="model"):
        compose_with(["model=alexnet"], tmp_path)


def test_unknown_model_name_is_refused(tmp_path):
    cfg = compose_with(["model.name=alexnet"], tmp_path)
    with pytest.raises(ConfigError, match="alexnet.*allowed: lenet5"):
        build_network(cfg.model, build_data(cfg.data))


def test_trainer_max_epochs_is_refused(tmp_path):
    cfg = compose_with(["+trainer.max_epochs=3"], tmp_path)
    with pytest.raises(ConfigError, match="trainer.max_epochs"):
        trainer_arguments(cfg.trainer)


@pytest.mark.parametrize("name", ["target_bits", "bayes_lr"])
def test_wandb_sweeps_are_valid(name):
    sweep = yaml.safe_load((CONF / "sweeps" / f"{name}.yaml").read_text())
    assert sweep["program"] == "train.py"
    assert sweep["command"] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
    assert sweep["metric"] == {"name": "test/acc", "goal": "maximize"}
    assert sweep["method"] == {"target_bits": "grid", "bayes_lr": "bayes"}[name]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config")
    for key in sweep["parameters"]:
        assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None, key


def has_optuna_sweeper() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ImportError:
        return False


@pytest.mark.skipif(not has_optuna_sweeper(), reason="hydra-optuna-sweeper is not installed")
def test_optuna_sweeper_composes(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/sweeper=optuna_lr"], return_hydra_config=True)
    assert cfg.hydra.sweeper.direction == "maximize"
