"""The ALQ app: float pretraining (cached) or a given checkpoint, then ALQ, then test; writes results.json and the
packed model (model.alq) into the run folder.

    python train.py                                          # the default job: LeNet5 / Fashion-MNIST, CPU minutes
    python train.py model=resnet18 alq.target_bits=0.7 experiment=smoke
    python train.py -m alq.target_bits=2,1,0.7,0.5,0.4,0.3   # accuracy vs bits, one job per target
    python train.py --cfg job                                # print the composed config

``alq-train`` (the installed console script) runs the same :func:`main` with the same arguments. The module is
named ``train`` so that Hydra's job name, and with it the log file ``train.log``, is the same either way.
"""
from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from alq_lightning import bit_summary, export_packed
from alq_lightning.app import (
    ALQRecorder,
    ConfigError,
    JobPlan,
    MetricContract,
    RunProgress,
    StageClock,
    apply_extras,
    build_alq_callback,
    build_callbacks,
    build_data,
    build_loggers,
    build_module,
    check_test_step,
    data_shape,
    finish_loggers,
    git_commit,
    hardware,
    load_checkpoint,
    make_trainer,
    obtain_float_weights,
    phase,
    pretrain_module,
    print_config,
    publish,
    resolve_wandb_mode,
    route_logging,
    save_plots,
    summarize_bits,
    to_container,
    trainer_arguments,
    write_results_then_export,
)

log = logging.getLogger("alq_lightning.app")
say = rank_zero_only(log.info)


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
    """Top-1 test accuracy of ``module`` (the ``test/acc`` it logs)."""
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    if "test/acc" not in metrics:
        raise ConfigError(f"model: {type(module).__name__} logs no 'test/acc' in its test_step (it logs: "
                          f"{', '.join(sorted(metrics)) or 'nothing'}); the app reports that metric")
    return float(metrics["test/acc"])


def measure_validation(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule,
                       metric: str) -> dict[str, float]:
    """The validation metrics of ``module``; ``metric`` (``optimized_metric``) must be among them."""
    metrics = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()}
    if metric not in metrics:
        raise ConfigError(f"optimized_metric={metric!r} is not logged by trainer.validate; it logs: "
                          f"{', '.join(sorted(metrics)) or 'nothing'}")
    return metrics


def check_run(cfg: DictConfig) -> Path:
    """Refuse a config that cannot run well before anything is built: a test metric to optimise, a missing
    ``ckpt_path``, an existing results file. Returns the results file's path."""
    metric = str(cfg.get("optimized_metric") or "")
    if not metric.startswith("val/"):
        raise ConfigError(f"optimized_metric={metric!r} must be a validation metric (val/...): model selection never "
                          "looks at the test set; test/acc is reported in results.json")
    if cfg.get("ckpt_path") and not Path(str(cfg.ckpt_path)).expanduser().is_file():
        raise ConfigError(f"ckpt_path={str(cfg.ckpt_path)!r} does not exist or is not a file (give an interrupted "
                          "run's last.ckpt)")
    results_path = Path(str(cfg.paths.output_dir)) / cfg.paths.results_file
    if results_path.exists():
        raise ConfigError(f"{results_path} exists already: a run never overwrites another's results; give this run "
                          "its own folder (hydra.run.dir, or paths.output_dir)")
    return results_path


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole pipeline for the composed config ``cfg``; return the results (also in results.json)."""
    route_logging()
    results_path = check_run(cfg)
    run_dir = results_path.parent
    apply_extras(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_data(cfg.data)
    shape = data_shape(datamodule)
    model = build_module(cfg.model, datamodule)
    check_test_step(model.module)
    callback = build_alq_callback(cfg.alq, model)
    if (cfg.get("extras") or {}).get("print_config"):
        filled = {"model": model.config, "alq": {**cfg.alq, "max_bits": callback.init.selection.max_bits}}
        wandb = (cfg.get("logger") or {}).get("wandb")
        if wandb is not None:  # the mode it will log in (offline without an API key), not the one asked for
            mode = resolve_wandb_mode(wandb.get("mode") or "online", say=False)
            filled["logger"] = {**cfg.logger, "wandb": {**wandb, "mode": mode}}
        print_config(cfg, filled)
    trainer_arguments(cfg.trainer)
    build_callbacks(cfg.get("callbacks"))  # fails now on a bad callbacks.* rather than after pretraining
    pretraining = pretrain_module(cfg, model)
    pretrained = load_checkpoint(cfg, model.network, shape) if cfg.pretrain.checkpoint else None
    config = to_container(cfg)
    loggers = build_loggers(cfg.get("logger"), config)
    failed = True
    try:
        clock = StageClock()
        plan = JobPlan({"pretraining": int(cfg.pretrain.epochs), "ALQ": callback.total_epochs})
        contract = MetricContract(str(cfg.optimized_metric))
        pretrained = pretrained or obtain_float_weights(cfg, model.network, pretraining, datamodule, loggers, shape,
                                                        [contract, RunProgress("pretraining", plan)])
        clock.add("pretrain", pretrained["seconds"])
        phase("float test", f"the float model's test accuracy ({pretrained['source']} weights)")
        with clock.measure("float_test"):
            float_acc = measure_accuracy(make_trainer(cfg, loggers, "float", 1), pretraining, datamodule)
        L.seed_everything(cfg.seed, workers=True)
        recorder = ALQRecorder(callback, clock)
        phase("ALQ", f"{callback.total_epochs} epochs to {callback.target_bits:g} average bits")
        trainer = make_trainer(cfg, loggers, "", callback.total_epochs,
                               callbacks=[recorder, callback, contract, RunProgress("ALQ", plan)], checkpointing=True)
        trainer.fit(model.module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        phase("final test", f"validation ({cfg.optimized_metric}) and test of the quantized model")
        with clock.measure("validate"):
            validation = measure_validation(trainer, model.module, datamodule, str(cfg.optimized_metric))
        with clock.measure("test"):
            test_acc = measure_accuracy(trainer, model.module, datamodule)
        summary = bit_summary(model.module)
        results = {
            "float_test_acc": float_acc,
            "test_acc": test_acc,
            "val_acc": validation.get("val/acc"),
            "optimized_metric": {"name": str(cfg.optimized_metric), "value": validation[str(cfg.optimized_metric)]},
            "target_bits": callback.target_bits,
            "initial_bits": recorder.initial_bits,
            **summarize_bits(summary, bit_summary(model.module, coord_bits=16)),
            "rounds": recorder.rounds,
            "timings_s": clock.rounded(),
            "epochs": {"pretrain": int(cfg.pretrain.epochs), "alq": callback.total_epochs},
            "pretrained": {k: v for k, v in pretrained.items() if k != "seconds"},
            "resumed_from": str(cfg.ckpt_path) if cfg.get("ckpt_path") else None,
            "data_files": list(dict.fromkeys(map(str, getattr(datamodule, "source_files", ())))),
            "config": config,
            "seed": cfg.seed,
            "git_commit": git_commit(),
            "hardware": hardware(),
            "logger": ", ".join(type(logger).__name__ for logger in loggers) or None,
        }
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            say(f"bits of the quantized model:\n{summary}")
            # results.json first: a failed export raises ExportError, with the failure recorded in results.json
            packed = write_results_then_export(results, results_path,
                                               lambda: export_packed(model.network, run_dir / cfg.paths.packed_file))
            publish(loggers, summary, results, save_plots(results, run_dir), Path(packed.path))
            say(f"float test acc {float_acc:.4f}; ALQ test acc {test_acc:.4f}, {cfg.optimized_metric} "
                f"{results['optimized_metric']['value']:.4f} at {summary.avg_bits:.4f} bits "
                f"(target {callback.target_bits:g}); results in {results_path}")
        elif isinstance(trainer.strategy, ModelParallelStrategy):  # FSDP2: the export gathers from every process
            export_packed(model.network, run_dir / cfg.paths.packed_file)
        failed = False
        return results
    finally:
        finish_loggers(loggers, failed)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> float:
    """Run :func:`train`; return ``optimized_metric`` (default ``val/acc``) of the quantized model, the objective
    of Hydra sweepers (``hparams_search=optuna_lr``). The test accuracy is reported, never optimised."""
    return float(train(cfg)["optimized_metric"]["value"])


if __name__ == "__main__":
    main()
