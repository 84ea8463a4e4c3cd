"""The README's callback example runs as written (on a slice of Fashion-MNIST): it ends within one slot's bits
below its 0.7-bit target and well above chance accuracy."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# Test accuracy on the 512-image test slice after 1024 training images (chance 0.10). The example is not seeded:
# four runs measured 0.725-0.736 (commits 2d18cc0 and 1935bf0, one thread).
ACCURACY_BAR = 0.6


def example() -> str:
    text = README.read_text()
    section = text[text.index("## Use it on your own LightningModule"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_callback_example_runs_and_reaches_the_target(tmp_path, monkeypatch):
    code = example()
    small = "FashionMNISTDataModule(batch_size=128, val_size=256, train_limit=1024, test_limit=512)"
    assert "FashionMNISTDataModule(batch_size=128)" in code
    code = code.replace("FashionMNISTDataModule(batch_size=128)", small)
    code = code.replace("L.Trainer(", "L.Trainer(enable_progress_bar=False, logger=False, enable_checkpointing=False, ")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    summary, network = namespace["bit_summary"](namespace["module"]), namespace["alq"].network
    largest_slot = max(layer.layout.group_size for layer in network.layers.values()) / network.numel
    assert 0.7 - largest_slot < summary.avg_bits <= 0.7
    assert network.avg_bits == summary.avg_bits
    accuracy = float(namespace["trainer"].callback_metrics["test/acc"])
    print(f"README example: test acc {accuracy:.4f} at {summary.avg_bits:.4f} bits")
    assert accuracy > ACCURACY_BAR


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
