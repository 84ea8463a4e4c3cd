"""The app's helpers alone: W&B mode and fallback, checkpoint reading, cache keys, atomic results."""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger

from alq_lightning.app import (
    ConfigError,
    ExportError,
    PhaseLogger,
    build_data,
    build_loggers,
    build_module,
    cache_key,
    finish_loggers,
    obtain_float_weights,
    pretrain_module,
    read_state_dict,
    resolve_wandb_mode,
    write_results,
    write_results_then_export,
)
from alq_lightning.app import loggers as app_loggers
from alq_lightning.models import build_model
from alq_lightning.packed.io import ExportReport

CONF = Path(__file__).resolve().parents[2] / "conf"
SHAPE = {"in_channels": 1, "num_classes": 10, "input_size": 28}


def compose_with(overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={tmp_path}", *overrides])


@pytest.fixture
def no_key(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


def test_online_without_key_goes_offline(no_key, caplog):
    """The default without a key: said at INFO (it is the documented behaviour, not a problem), not warned."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.INFO, logger="alq_lightning.app"):
            assert resolve_wandb_mode("online") == "offline"
    assert caplog.messages == ["W&B: no API key (WANDB_API_KEY or `wandb login`), so logging offline into the run "
                               "folder; `wandb sync` uploads it later"]
    assert resolve_wandb_mode("disabled") == "disabled"


def test_netrc_entry_counts_as_key(no_key, tmp_path):
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / "netrc").chmod(0o600)
    assert resolve_wandb_mode("online") == "online"


def test_wandb_mode_env_wins_and_bad_mode_is_refused(no_key, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("online") == "offline"
    monkeypatch.setenv("WANDB_MODE", "sideways")
    with pytest.raises(ConfigError, match="logger.wandb.mode='sideways' .* allowed: online, offline, disabled"):
        resolve_wandb_mode("online")


def test_wandb_failure_falls_back_to_csv(monkeypatch, tmp_path):
    real = app_loggers.build_one

    def broken(key, node):
        if key == "wandb":
            raise RuntimeError("no wandb here")
        return real(key, node)

    monkeypatch.setattr(app_loggers, "build_one", broken)
    cfg = compose_with(["logger=wandb"], tmp_path)
    with pytest.warns(UserWarning, match="W&B is unavailable.*CSV"):
        loggers = build_loggers(cfg.logger, {"seed": 0})
    assert [type(logger) for logger in loggers] == [CSVLogger] and loggers[0].save_dir == str(tmp_path)
    finish_loggers(loggers, failed=False)
    cfg = compose_with(["logger=many_loggers"], tmp_path)
    with pytest.warns(UserWarning, match="W&B is unavailable.*CSV"):
        loggers = build_loggers(cfg.logger, {"seed": 0})
    assert [type(logger) for logger in loggers] == [CSVLogger], "one CSV logger, not a second one as fallback"
    finish_loggers(loggers, failed=False)


def test_phase_logger_prefixes_metrics(tmp_path):
    inner = CSVLogger(tmp_path)
    PhaseLogger(inner, "pretrain").log_metrics({"train/loss": 1.0}, step=0)
    PhaseLogger(inner, "").log_metrics({"test/acc": 0.5}, step=1)
    inner.save()
    header = (Path(inner.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "pretrain/train/loss" in header and "test/acc" in header


@pytest.mark.parametrize("wrap", ["plain", "prefixed", "lightning"])
def test_checkpoint_forms_are_read(wrap, tmp_path):
    state = build_model("lenet5", 1, 10, 28).state_dict()
    payload = {"plain": state, "prefixed": {f"model.{k}": v for k, v in state.items()},
               "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}}[wrap]
    torch.save(payload, tmp_path / "ckpt.pt")
    assert read_state_dict(tmp_path / "ckpt.pt").keys() == state.keys()


def test_unreadable_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable PyTorch checkpoint"):
        read_state_dict(tmp_path / "junk.pt")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(ConfigError, match="holds no state_dict"):
        read_state_dict(tmp_path / "empty.pt")


def test_cache_key_follows_what_decides_the_weights(tmp_path):
    base = cache_key(compose_with([], tmp_path), SHAPE)
    assert base == cache_key(compose_with(["data.root=/elsewhere", "alq.target_bits=0.3"], tmp_path), SHAPE)
    assert base == cache_key(compose_with(["alq.lr=0.01", "model.optimizer.lr=0.3"], tmp_path), SHAPE), \
        "the ALQ phase's optimizer does not decide the pretrained weights"
    for override in ("pretrain.epochs=7", "seed=1", "pretrain.optimizer.lr=0.1", "pretrain.scheduler=null",
                     "data.train_limit=100", "model=resnet18", "data=mnist"):
        assert cache_key(compose_with([override], tmp_path), SHAPE) != base, override


def test_results_are_written_atomically_and_never_overwritten(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_results({"a": float("nan"), "b": (1, 2), "c": torch.tensor(0.5)}, tmp_path / "r.json")
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"a": None, "b": [1, 2], "c": 0.5}
    assert path.stat().st_mode & 0o777 == 0o640
    with pytest.raises(TypeError):
        write_results({"bad": object()}, tmp_path / "r.json")
    with pytest.raises(FileExistsError, match="r.json' exists already; it is not overwritten"):
        write_results({"c": 1.0}, tmp_path / "r.json")
    assert json.loads(path.read_text())["c"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_results_are_on_disk_before_the_export_and_then_name_its_file_or_its_failure(tmp_path):
    path, written = tmp_path / "results.json", []

    def export(name: str, error: Exception | None = None):
        written.append(json.loads(path.read_text()))
        if error is not None:
            raise error
        (tmp_path / name).write_bytes(b"12345")
        return ExportReport(str(tmp_path / name), 32, 0.5, 3, 1, 1, 0, 5, 5)

    packed = write_results_then_export({"test_acc": 0.5}, path, lambda: export("model.alq"))
    assert written == [{"test_acc": 0.5, "packed_file": None}] and packed.file_bytes == 5
    assert json.loads(path.read_text()) == {"test_acc": 0.5,
                                            "packed_file": {"name": "model.alq", "bytes": 5, "avg_bits": 0.5}}
    with pytest.raises(FileExistsError):
        write_results_then_export({"test_acc": 0.5}, path, lambda: export("other.alq"))
    failed = tmp_path / "failed" / "results.json"
    path = failed
    with pytest.raises(ExportError, match=r"packed export failed \(ValueError: layer 'fc': no\); its results are in "):
        write_results_then_export({"test_acc": 0.25}, failed, lambda: export("x.alq", ValueError("layer 'fc': no")))
    assert written[-1] == {"test_acc": 0.25, "packed_file": None}
    assert json.loads(failed.read_text()) == {"test_acc": 0.25, "packed_file": {"error": "ValueError: layer 'fc': no"}}
    assert sorted(p.name for p in failed.parent.iterdir()) == ["results.json"]


def test_cached_weights_follow_the_umask(tmp_path):
    cfg = compose_with(["data=synthetic", "data.input_size=16", "data.train_size=32", "data.val_size=16",
                        "data.test_size=16", "data.batch_size=16", "pretrain.epochs=1", "logger=none",
                        "trainer.enable_progress_bar=false", f"pretrain.cache_dir={tmp_path / 'cache'}"], tmp_path)
    datamodule = build_data(cfg.data)
    shape = {"in_channels": 3, "num_classes": 10, "input_size": 16}
    model = build_module(cfg.model, datamodule)
    module = pretrain_module(cfg, model)
    assert module is not model.module and module.model is model.network
    assert isinstance(module.configure_optimizers()["optimizer"], torch.optim.SGD)
    assert isinstance(model.module.configure_optimizers(), torch.optim.Adam)
    old = os.umask(0o027)
    try:
        source = obtain_float_weights(cfg, model.network, module, datamodule, [], shape)
    finally:
        os.umask(old)
    assert source["source"] == "trained"
    assert Path(source["path"]).stat().st_mode & 0o777 == 0o640
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(source["path"]).name]


def test_wandb_is_imported_only_by_the_app():
    package = Path(__file__).resolve().parents[2] / "alq_lightning"
    importers = [p for p in package.rglob("*.py") if "import wandb" in p.read_text() and "app" not in p.parts]
    assert importers == []
