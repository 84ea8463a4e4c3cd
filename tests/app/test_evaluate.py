"""``alq-eval model.alq``: a run's packed model scores on the test set what the run reported, from the file and the
run folder's config alone or from the app's config groups; bad input is refused."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from alq_lightning.cli import dispatch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from train import train  # noqa: E402

LIMITS = ["data.batch_size=64", "data.train_limit=128", "data.val_limit=128", "data.test_limit=256"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A smoke run of LeNet5 on Fashion-MNIST: its folder and results."""
    tmp = tmp_path_factory.mktemp("eval")
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "logger=none", f"paths.output_dir={tmp / 'run'}",
                                           f"pretrain.cache_dir={tmp / 'cache'}", "extras.print_config=false",
                                           "trainer.enable_progress_bar=false"])
    return tmp / "run", train(cfg)


def reported(capsys) -> tuple[float, str]:
    out = capsys.readouterr().out
    return float(out.split("test accuracy ")[1].split()[0]), out


def test_the_run_folders_config_gives_the_runs_test_accuracy(run, capsys):
    folder, results = run
    assert dispatch(["eval", str(folder / "model.alq")]) == 0
    accuracy, out = reported(capsys)
    # The packed weights are rebuilt from the file (Σ α_k β_k, possibly summed in another order than in training),
    # so at most one of the 256 test images may change its argmax on a near-tie.
    assert abs(accuracy - results["test_acc"]) <= 1 / 256
    assert (f"on 256 FashionMNISTDataModule test samples; {results['packed_file']['bytes']} bytes, "
            f"{results['packed_file']['avg_bits']:.4f} average bits per quantized weight") in out


def test_the_config_groups_and_bitwise_give_the_same(run, capsys):
    folder, results = run
    assert dispatch(["eval", str(folder / "model.alq"), "--model", "lenet5", "--data", "fashion_mnist",
                     *LIMITS, "seed=0"]) == 0
    accuracy, _ = reported(capsys)
    assert abs(accuracy - results["test_acc"]) <= 1 / 256
    assert dispatch(["eval", str(folder / "model.alq"), "--bitwise"]) == 0
    bitwise, out = reported(capsys)
    assert bitwise == accuracy and "(bitwise)" in out  # no quantized inputs: bitwise changes nothing


@pytest.mark.parametrize("args,message", [
    (["--model", "lenet5"], "--model and --data go together"),
    (["--run", "/nowhere"], "/nowhere/results.json does not exist: give the run folder (--run DIR) or the config "
                            "groups (--model NAME --data NAME)"),
    (["--model", "resnet18", "--data", "fashion_mnist", *LIMITS],
     "layer 'conv1': the model's weight is (64, 1, 3, 3), the file's (20, 1, 5, 5)"),
])
def test_bad_input_is_refused(run, capsys, args, message):
    folder, _ = run
    assert dispatch(["eval", str(folder / "model.alq"), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
