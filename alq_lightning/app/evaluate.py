"""``alq-eval model.alq`` (``python -m alq_lightning eval``): a packed model's top-1 accuracy on a data module's test
set, with the file's bytes and average bits. The network and the data come from the app's config groups
(``--model lenet5 --data fashion_mnist``) or from the run folder's resolved config (``results.json`` beside the file,
or ``--run DIR``); ``key=value`` arguments override that config (``data.test_limit=1000``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from alq_lightning.app.builders import build_data, build_module
from alq_lightning.app.common import ConfigError
from alq_lightning.packed.inference import load_packed_for_inference
from alq_lightning.packed.io import packed_summary, read_packed


def run_config(folder: Path) -> DictConfig:
    """The resolved config a run recorded in ``folder/results.json``."""
    path = folder / "results.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: give the run folder (--run DIR) or the config groups "
                          "(--model NAME --data NAME)")
    return OmegaConf.create(json.loads(path.read_text())["config"])


def group_config(model: str, data: str, overrides: Sequence[str]) -> DictConfig:
    """The app's config with ``model`` and ``data`` chosen from its groups and ``overrides`` applied."""
    from hydra import compose, initialize_config_dir

    from alq_lightning.app.train import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[f"model={model}", f"data={data}", *overrides])


def accuracy_on_test_set(model: nn.Module, datamodule) -> tuple[float, int]:
    """Top-1 accuracy of ``model`` over ``datamodule``'s test set, and the number of samples."""
    datamodule.prepare_data()
    datamodule.setup("test")
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in datamodule.test_dataloader():
            correct += int((model(inputs).argmax(1) == labels).sum())
            total += len(labels)
    if total == 0:
        raise ConfigError(f"the test set of {type(datamodule).__name__} is empty")
    return correct / total, total


def evaluate(path: str | os.PathLike, cfg: DictConfig, bitwise: bool = False) -> dict[str, float | int | str]:
    """Accuracy of the packed file ``path`` on the test set of ``cfg.data`` with the network of ``cfg.model``, and
    the file's bytes and average bits."""
    datamodule = build_data(cfg.data)
    network = build_module(cfg.model, datamodule).network
    packed = load_packed_for_inference(path, network, bitwise=bitwise)
    accuracy, samples = accuracy_on_test_set(packed, datamodule)
    return {"test_acc": accuracy, "samples": samples, "file_bytes": os.path.getsize(path),
            "avg_bits": packed_summary(read_packed(path).header).avg_bits, "data": type(datamodule).__name__}


def eval_main(argv: Sequence[str] | None = None, prog: str = "python -m alq_lightning eval") -> int:
    """Print a packed model's test accuracy, bytes and bits. Returns the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description="Test accuracy, bytes and bits of a packed model.")
    parser.add_argument("path", help="packed file (.alq), e.g. a run folder's model.alq")
    parser.add_argument("--model", help="network from the app's model group (lenet5, resnet18, ...)")
    parser.add_argument("--data", help="data set from the app's data group (fashion_mnist, cifar10, ...)")
    parser.add_argument("--run", help="run folder whose results.json holds the config (default: the file's folder)")
    parser.add_argument("--bitwise", action="store_true", help="run layers with quantized inputs bitwise")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config (data.test_limit=1000)")
    args = parser.parse_intermixed_args(None if argv is None else list(argv))
    try:
        if (args.model is None) != (args.data is None):
            raise ConfigError("--model and --data go together (or neither, for the run folder's config)")
        if args.model:
            cfg = group_config(args.model, args.data, args.overrides)
        else:
            cfg = OmegaConf.merge(run_config(Path(args.run or Path(args.path).parent)),
                                  OmegaConf.from_dotlist(args.overrides))
        result = evaluate(args.path, cfg, args.bitwise)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.path}: test accuracy {result['test_acc']:.4f} on {result['samples']} {result['data']} test "
          f"samples{' (bitwise)' if args.bitwise else ''}; {result['file_bytes']} bytes, {result['avg_bits']:.4f} "
          "average bits per quantized weight")
    return 0
