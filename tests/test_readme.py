"""Every code block of the README runs as written: the python blocks executed verbatim (the callback example on a
slice of Fashion-MNIST through patched defaults, never an edited text), the LightningCLI YAML through LightningCLI
with the package's ClassifierModule, and every ``python train.py ...`` line of the bash blocks composes with Hydra
and names configs and files that exist."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import lightning
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import alq_lightning.data
from alq_lightning.data import FashionMNISTDataModule
from alq_lightning.packed.inference import PackedModel

from quantized_models import lenet, quantized, sample

README = Path(__file__).resolve().parents[1] / "README.md"
# Test accuracy on the 512-image test slice after 1024 training images (chance 0.10). The example is not seeded:
# four runs measured 0.725-0.736 (commits 2d18cc0 and 1935bf0, one thread).
ACCURACY_BAR = 0.6
SLICE = {"val_size": 256, "train_limit": 1024, "test_limit": 512}
QUIET = {"enable_progress_bar": False, "logger": False, "enable_checkpointing": False}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def test_these_tests_run_every_block_of_the_readme():
    assert set(re.findall(r"```(\w+)\n", README.read_text())) == {"bash", "python", "yaml"}
    assert [len(blocks(language)) for language in ("bash", "python", "yaml")] == [2, 2, 1]


@pytest.mark.slow
def test_callback_example_runs_and_reaches_the_target(tmp_path, monkeypatch):
    """The example's text as it stands; only the defaults of the data module (a slice) and of the Trainer (no
    bar, logger or checkpoint) are patched."""
    code = blocks("python")[0]
    assert "FashionMNISTDataModule(batch_size=128)" in code

    class Slice(FashionMNISTDataModule):
        def __init__(self, **kwargs):
            super().__init__(**{**SLICE, **kwargs})

    class Quiet(lightning.Trainer):
        def __init__(self, **kwargs):
            super().__init__(**{**QUIET, **kwargs})

    monkeypatch.setattr(alq_lightning.data, "FashionMNISTDataModule", Slice)
    monkeypatch.setattr(lightning, "Trainer", Quiet)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert isinstance(namespace["data"], Slice) and isinstance(namespace["trainer"], Quiet)
    summary, network = namespace["bit_summary"](namespace["module"]), namespace["alq"].network
    largest_slot = max(layer.layout.group_size for layer in network.layers.values()) / network.numel
    assert 0.7 - largest_slot < summary.avg_bits <= 0.7
    assert network.avg_bits == summary.avg_bits
    accuracy = float(namespace["trainer"].callback_metrics["test/acc"])
    print(f"README example: test acc {accuracy:.4f} at {summary.avg_bits:.4f} bits")
    assert accuracy > ACCURACY_BAR


def test_packed_file_example_runs(tmp_path, monkeypatch):
    """The block's ``model`` is a quantized LeNet5 and ``fresh_model`` an untrained one; the loaded model computes
    what the packed one does (float16 coordinates in both, so only summation order differs)."""
    monkeypatch.chdir(tmp_path)
    namespace = {"model": quantized(lenet), "fresh_model": lenet().eval()}
    exec(compile(blocks("python")[1], str(README), "exec"), namespace)
    assert namespace["report"].file_bytes == (tmp_path / "model.alq").stat().st_size
    assert isinstance(namespace["packed"], PackedModel)
    x = sample(lenet)
    with torch.no_grad():
        torch.testing.assert_close(namespace["packed"](x), namespace["fresh_model"](x), rtol=1e-5, atol=1e-5)


def test_lightning_cli_yaml_runs_with_the_packages_module(tmp_path, monkeypatch):
    """The YAML verbatim, with the module and data given on the command line and a short fit (each stage one
    batch)."""
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["readme"])
    config = tmp_path / "readme.yaml"
    config.write_text(blocks("yaml")[0])
    cli = LightningCLI(
        alq_lightning.module.ClassifierModule, FashionMNISTDataModule, run=False, save_config_callback=None,
        args=["--config", str(config), "--model.net=alq_lightning.models.LeNet5", "--model.num_classes=10",
              "--data.batch_size=64", "--data.train_limit=64", "--data.val_limit=64", "--data.test_limit=64",
              "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.accelerator=cpu",
              "--trainer.logger=false", "--trainer.enable_checkpointing=false",
              "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])
    (alq,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "ALQCallback"]
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.current_epoch == alq.total_epochs == 40
    assert alq.network.layers["model.conv1"].layout.structure == "kernelwise"
    assert alq.network.avg_bits <= 0.7


def train_lines() -> list[list[str]]:
    """The arguments of every ``python train.py`` line of the bash blocks, comments cut and the placeholder
    ``<run>`` (a run folder's name) filled."""
    lines = [line.split("#")[0].replace("<run>", "2026-12-07/12-00-00-000000-3fa2c1")
             for block in blocks("bash") for line in block.splitlines()]
    return [shlex.split(line)[2:] for line in lines if line.strip().startswith("python train.py")]


def jobs(arguments: list[str]) -> list[list[str]]:
    """The overrides of each job of a command: one job, or with ``-m`` one per value of its comma lists."""
    overrides = [a for a in arguments if a != "-m"]
    if "-m" not in arguments:
        return [overrides]
    ((key, values),) = [o.split("=", 1) for o in overrides if "," in o]
    rest = [o for o in overrides if "," not in o]
    return [[*rest, f"{key}={value}"] for value in values.split(",")]


def test_every_train_command_of_the_readme_composes():
    """Each job composes and holds the values its command sets (group choices are checked to exist below)."""
    commands = train_lines()
    assert len(commands) == 7 and [] in commands and ["-m", "alq.target_bits=2,1,0.7,0.5,0.4,0.3"] in commands
    with initialize_config_dir(config_dir=str(README.parent / "conf"), version_base="1.3"):
        for arguments in commands:
            for overrides in jobs(arguments):
                cfg = compose("config", overrides=overrides)
                for key, value in (o.split("=", 1) for o in overrides):
                    if "." in key or key == "ckpt_path":
                        assert str(OmegaConf.select(cfg, key)) == value, (key, value)
    files = [word for block in blocks("bash") for word in re.findall(r"[\w./-]+\.(?:txt|yaml|py)\b", block)]
    assert {"constraints-cpu.txt", "train.py", "bench/sweeps/target_bits.yaml"} <= set(files)
    assert all((README.parent / name).is_file() for name in files), files


CONF_README = README.parent / "conf" / "README.md"
GROUP_CHOICE = r"\b(data|model|alq|callbacks|trainer|logger|experiment|hparams_search)=(\w+)"


def test_app_commands_name_configs_that_exist():
    text = README.read_text() + CONF_README.read_text()
    choices = [(group, option) for group, option in re.findall(GROUP_CHOICE, text) if option != "mine"]
    assert ("experiment", "mnist_lenet5") in choices and ("hparams_search", "optuna_lr") in choices
    for group, option in choices:
        assert (README.parent / "conf" / group / f"{option}.yaml").is_file(), f"{group}={option}"
    sweeps = re.findall(r"wandb sweep (\S+\.yaml)", text)
    assert sweeps and all((README.parent / path).is_file() for path in sweeps)
    for old in ("lenet5_mnist", "vgg_small_cifar10", "resnet18_imagenet", "conf/sweeps", "hydra/sweeper"):
        assert old not in text, old
