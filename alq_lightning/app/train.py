"""The ALQ app: float pretraining (cached) or a given checkpoint, then ALQ, then test; writes results.json and the
packed model (model.alq) into the run folder.

    python train.py                                          # experiment fmnist_lenet5 (a few CPU minutes)
    python train.py model=resnet18 alq.target_bits=0.7 experiment=smoke
    python train.py -m alq.target_bits=2,1,0.7,0.5,0.4,0.3   # accuracy vs bits, one job per target
    python train.py --cfg job                                # print the composed config

``alq-train`` (the installed console script) runs the same :func:`main` with the same arguments. The module is
named ``train`` so that Hydra's job name, and with it the log file ``train.log``, is the same either way.
"""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from alq_lightning import bit_summary, export_packed
from alq_lightning.app import (
    ALQRecorder,
    ConfigError,
    StageClock,
    build_alq_callback,
    build_data,
    build_logger,
    build_network,
    finish_logger,
    float_lr,
    git_commit,
    hardware,
    load_checkpoint,
    make_trainer,
    model_architecture,
    obtain_float_weights,
    publish,
    save_plots,
    summarize_bits,
    to_container,
    trainer_arguments,
    write_results,
)
from alq_lightning.app.pretrain import pretrain_module
from alq_lightning.module import ClassifierModule

say = rank_zero_only(print)


def config_dir() -> Path:
    """The Hydra config folder: ``alq_lightning/conf`` where a wheel installed it (pyproject maps the repository's
    ``conf/`` there), else ``conf/`` of the source checkout the package is imported from."""
    package = Path(__file__).resolve().parents[1]
    installed, checkout = package / "conf", package.parent / "conf"
    return installed if (installed / "config.yaml").is_file() else checkout


def run_token() -> str:
    """Six random hex digits ending a run folder's name (``${run_token:}`` in conf/config.yaml). Cached per
    config, and Hydra copies the cache to every job of a sweep, so that one run resolves one value."""
    return secrets.token_hex(3)


OmegaConf.register_new_resolver("run_token", run_token, use_cache=True, replace=True)


def measure_accuracy(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule) -> float:
    """Top-1 test accuracy of ``module``."""
    return float(trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"])


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole pipeline for the composed config ``cfg``; return the results (also in results.json)."""
    run_dir = Path(str(cfg.paths.output_dir))
    results_path = run_dir / cfg.paths.results_file
    if results_path.exists():
        raise ConfigError(f"{results_path} exists already: a run never overwrites another's results; give this run "
                          "its own folder (hydra.run.dir, or paths.output_dir)")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_data(cfg.data)
    architecture = model_architecture(cfg.model, datamodule)
    shape = {key: architecture[key] for key in ("in_channels", "num_classes", "input_size")}
    network = build_network(cfg.model, datamodule)
    callback = build_alq_callback(cfg.alq, cfg.model.name, network)
    trainer_arguments(cfg.trainer)
    pretrained = load_checkpoint(cfg, network, shape) if cfg.pretrain.checkpoint else None
    config = to_container(cfg)
    logger = build_logger(cfg.logger, config)
    failed = True
    try:
        clock = StageClock()
        pretrained = pretrained or obtain_float_weights(cfg, network, datamodule, logger, shape)
        clock.add("pretrain", pretrained["seconds"])
        with clock.measure("float_test"):
            float_acc = measure_accuracy(make_trainer(cfg, logger, "float", 1), pretrain_module(cfg, network,
                                      shape["num_classes"]), datamodule)
        L.seed_everything(cfg.seed, workers=True)
        module = ClassifierModule(network, shape["num_classes"], optimizer="adam", lr=float_lr(cfg.alq),
                                  architecture=architecture)
        recorder = ALQRecorder(callback, clock)
        trainer = make_trainer(cfg, logger, "", callback.total_epochs, callbacks=[recorder, callback])
        trainer.fit(module, datamodule=datamodule)
        with clock.measure("test"):
            test_acc = measure_accuracy(trainer, module, datamodule)
        summary = bit_summary(module)
        results = {
            "float_test_acc": float_acc,
            "test_acc": test_acc,
            "target_bits": callback.target_bits,
            "initial_bits": recorder.initial_bits,
            **summarize_bits(summary, bit_summary(module, coord_bits=16)),
            "rounds": recorder.rounds,
            "timings_s": clock.rounded(),
            "epochs": {"pretrain": int(cfg.pretrain.epochs), "alq": callback.total_epochs},
            "pretrained": {k: v for k, v in pretrained.items() if k != "seconds"},
            "data_files": list(dict.fromkeys(map(str, datamodule.source_files))),
            "config": config,
            "seed": cfg.seed,
            "git_commit": git_commit(),
            "hardware": hardware(),
            "logger": type(logger).__name__ if logger is not None else None,
        }
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            packed = export_packed(network, run_dir / cfg.paths.packed_file)
            results["packed_file"] = {"name": Path(packed.path).name, "bytes": packed.file_bytes,
                                      "avg_bits": packed.avg_bits}
            say(summary)
            publish(logger, summary, results, save_plots(results, run_dir))
            path = write_results(results, results_path)
            say(f"float test acc {float_acc:.4f}; ALQ test acc {test_acc:.4f} at {summary.avg_bits:.4f} bits "
                f"(target {callback.target_bits:g}); results in {path}")
        failed = False
        return results
    finally:
        finish_logger(logger, failed)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> float:
    """Run :func:`train`; the quantized test accuracy is returned as the objective of Hydra sweepers."""
    return float(train(cfg)["test_acc"])


if __name__ == "__main__":
    main()
