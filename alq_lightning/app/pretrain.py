"""Float weights before ALQ: a given checkpoint, the cache, or a fresh pretraining run (then cached)."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from alq_lightning.app.builders import make_trainer
from alq_lightning.app.common import TARGET, ConfigError, to_container
from alq_lightning.app.console import phase
from alq_lightning.files import write_atomic

MODEL_PREFIX = "model."
PRETRAIN_KEYS = ("epochs", "optimizer", "scheduler")
ALQ_ONLY_MODEL_KEYS = ("optimizer", "scheduler", "architecture")
DATA_KEYS_IGNORED = ("root", "download", "eval_batch_size", "val_limit", "test_limit", "num_workers", "pin_memory")


def cache_key(cfg: DictConfig, shape: dict[str, int]) -> str:
    """Short hash of what decides the pretrained weights: model, data, seed, pretraining settings, precision."""
    data = {k: v for k, v in to_container(cfg.data).items() if k not in DATA_KEYS_IGNORED}
    pretrain = {k: to_container(cfg.pretrain.get(k)) for k in PRETRAIN_KEYS}
    model = to_container(cfg.model)
    if cfg.pretrain.get("optimizer") is not None:  # then the module's own optimizer is ALQ's, not pretraining's
        model = {k: v for k, v in model.items() if k not in ALQ_ONLY_MODEL_KEYS}
    identity = {"model": model, "data": data, "shape": shape, "seed": cfg.seed,
                "pretrain": pretrain, "precision": str(cfg.trainer.get("precision", "32-true"))}
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def class_name(cfg: DictConfig) -> str:
    """The class a ``_target_`` config builds, without its module: ``LeNet5``."""
    return str(cfg.get(TARGET, "?")).rsplit(".", 1)[-1]


def network_name(cfg: DictConfig) -> str:
    """The class name of the ``model`` group's network (``model.net``), else of its module."""
    return class_name(cfg.model.net if OmegaConf.is_dict(cfg.model.get("net")) else cfg.model)


def cache_path(cfg: DictConfig, shape: dict[str, int]) -> Path:
    """``<pretrain.cache_dir>/<network class>-<data module class>-s<seed>-e<epochs>-<hash>.pt``."""
    name = (f"{network_name(cfg)}-{class_name(cfg.data)}-s{cfg.seed}-e{cfg.pretrain.epochs}-"
            f"{cache_key(cfg, shape)}.pt")
    return Path(os.path.expanduser(str(cfg.pretrain.cache_dir))) / name


def read_state_dict(path: str | Path, source: str = "pretrain.checkpoint") -> dict[str, torch.Tensor]:
    """The weights in ``path``: a Lightning checkpoint (``state_dict`` key), a cache file or a plain
    state_dict; a ``"model."`` prefix (from ``ClassifierModule``) is removed. Errors name ``source``."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise ConfigError(f"{source}={str(path)!r} does not exist or is not a file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{source}={str(path)!r} is not a readable PyTorch checkpoint: {err}") from err
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(
            f"{source}={str(path)!r} holds no state_dict of tensors (expected a Lightning checkpoint "
            "or the result of torch.save(model.state_dict()))"
        )
    if all(k.startswith(MODEL_PREFIX) for k in state):
        state = {k[len(MODEL_PREFIX):]: v for k, v in state.items()}
    return state


def load_weights(network: nn.Module, state: dict[str, torch.Tensor], source: str, described: str) -> None:
    """Load ``state`` into ``network``; a mismatch raises :class:`ConfigError` naming both shapes."""
    expected = network.state_dict()
    shapes = [f"{k} is {list(v.shape)} in the checkpoint but {list(expected[k].shape)} in the model"
              for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = shapes[:3]
    if missing:
        problems.append(f"missing in the checkpoint: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"not in the model: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    if problems:
        raise ConfigError(f"{source} does not fit {described}: " + "; ".join(problems))
    network.load_state_dict(state)


def describe(cfg: DictConfig, shape: dict[str, int]) -> str:
    """``model=LeNet5 for data=FashionMNISTDataModule (1 channel(s), 28x28 inputs, 10 classes)``."""
    size = shape.get("input_size", "?")
    return (f"model={network_name(cfg)} for data={class_name(cfg.data)} ({shape.get('in_channels', '?')} "
            f"channel(s), {size}x{size} inputs, {shape.get('num_classes', '?')} classes)")


def load_checkpoint(cfg: DictConfig, network: nn.Module, shape: dict[str, int]) -> dict[str, Any]:
    """Load ``pretrain.checkpoint`` into ``network`` (clear errors when unreadable or mismatching)."""
    state = read_state_dict(cfg.pretrain.checkpoint)
    load_weights(network, state, f"pretrain.checkpoint={cfg.pretrain.checkpoint!r}", describe(cfg, shape))
    return {"source": "checkpoint", "path": str(cfg.pretrain.checkpoint), "seconds": 0.0}


def obtain_float_weights(cfg: DictConfig, network: nn.Module, module: LightningModule,
                         datamodule: LightningDataModule, loggers: list[Logger], shape: dict[str, int],
                         callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Put float weights into ``network``: the cached ones, or ``pretrain.epochs`` of fresh training of ``module``
    (which holds ``network``, with ``callbacks`` in its Trainer; then cached). Returns where they came
    from. A given ``pretrain.checkpoint`` is loaded by :func:`load_checkpoint`."""
    if cfg.pretrain.checkpoint:
        return load_checkpoint(cfg, network, shape)
    if cfg.pretrain.epochs == 0:
        return {"source": "random", "path": None, "seconds": 0.0}
    path = cache_path(cfg, shape)
    if path.is_file():
        try:
            load_weights(network, read_state_dict(path, "cached weights"), f"cached weights {path}",
                         describe(cfg, shape))
            phase("pretraining", f"skipped: float weights from the cache {path}")
            return {"source": "cache", "path": str(path), "seconds": 0.0}
        except ConfigError as err:
            rank_zero_warn(f"ignoring the cache file ({err}); pretraining again")
    epochs = int(cfg.pretrain.epochs)
    phase("pretraining", f"{epochs} epoch{'s' * (epochs != 1)} of float training, then cached in {path}")
    trainer = make_trainer(cfg, loggers, "pretrain", epochs, callbacks)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    state = get_model_state_dict(network, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.is_global_zero:  # whole weights (gathered from every process when FSDP2 shards them)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"state_dict": state, "key": cache_key(cfg, shape)}
        write_atomic(path, lambda handle: torch.save(payload, handle))
    return {"source": "trained", "path": str(path), "seconds": seconds}
