"""What a run says: the default job redirected to a file (as in a batch job) names its phases, states its schedule
and an estimate, logs a line per epoch, prints the config that runs (no ``???``) and leaves all of it, the final
table included, in Hydra's ``train.log``, with no warning the project could avoid. Then the pieces one by one:
Lightning's messages and warnings routed once into the root's handlers, and the GPU-sized notice."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.utilities import rank_zero_info

from alq_lightning.app.console import GPU_SIZED_S, JobPlan, RunProgress, duration, route_logging

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("=== pretraining: 1 epoch of float training, then cached in", "=== float test:", "=== ALQ: 5 epochs to 0.7",
          "=== final test:")


@pytest.fixture(scope="module")
def default_job(tmp_path_factory):
    """``python train.py experiment=smoke`` as a newcomer runs it: W&B without a key, stdout into a file."""
    tmp = tmp_path_factory.mktemp("job")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(NETRC=str(tmp / "netrc"), OMP_NUM_THREADS="1", ALQ_CACHE=str(tmp / "cache"))
    with open(tmp / "console.txt", "w") as console:
        subprocess.run([sys.executable, "train.py", "experiment=smoke", f"hydra.run.dir={tmp / 'run'}"], cwd=ROOT,
                       env=env, stdout=console, stderr=subprocess.STDOUT, check=True, timeout=600)
    return (tmp / "console.txt").read_text(), (tmp / "run" / "train.log").read_text()


def test_the_job_log_holds_the_whole_run_in_order(default_job):
    console, log = default_job
    for text in (console, log):
        where = [text.index(phase) for phase in PHASES]
        assert where == sorted(where), "the phases are named in the order they run"
        for line in ("ALQ schedule: 1 round × (1 basis + 1 coordinate + 1 pruning), 1 STE, 1 final coordinate "
                     "epochs (5 in all), to 0.7 average bits", "ALQ pruning 1/1: epochs 2-2 of 5",
                     "ms per training step; about", "pretraining epoch 1/1: train/loss_epoch",
                     "ALQ epoch 3/5: pruning 1/1 at 0.", "ALQ epoch 5/5: final at 0.", "left in the job",
                     "`Trainer.fit` stopped: `max_epochs=5` reached.", "bits of the quantized model:",
                     "whole model:", "float test acc", "W&B: no API key"):
            assert line in text, line
    assert log.count("ALQ initialised at 6.000 average bits") == 1, "Lightning's messages reach the log once"


def test_the_printed_config_is_the_one_that_runs(default_job):
    console, log = default_job
    config = log[log.index("config of this run:"):log.index("W&B: no API key")]
    assert "???" not in config
    for filled in ("in_channels: 1", "num_classes: 10", "input_size: 28", "name: lenet5", "max_bits: 6",
                   "mode: offline"):  # W&B without an API key logs offline, whatever logger.wandb.mode asks
        assert filled in config, filled


def test_the_default_job_prints_no_avoidable_warning(default_job):
    console, log = default_job
    for text in (console, log):
        for avoidable in ("WARNING", "Warning", "💡 Tip", "exists and is not empty", "anonymous setting",
                          "Tracking run with wandb", "already configured with model summary"):
            assert avoidable not in text, avoidable


@pytest.fixture
def root_handler():
    """A handler on the root logger, as Hydra installs, restored afterwards with the loggers route_logging
    changes."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    root = logging.getLogger()
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
             for name in ("lightning", "lightning.pytorch", "lightning.fabric")}
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield records
    root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)
    for name, (handlers, propagate) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate


def test_lightning_messages_and_warnings_reach_the_roots_handlers_once(root_handler):
    with warnings.catch_warnings():
        route_logging()
        rank_zero_info("a Lightning message")
        rank_zero_info("💡 Tip: an advertisement")
        warnings.warn("a warning of the run", UserWarning, stacklevel=1)
    messages = [record.getMessage() for record in root_handler]
    assert messages.count("a Lightning message") == 1
    assert not any("Tip" in message for message in messages)
    assert [m for m in messages if "a warning of the run" in m and "UserWarning" in m], messages
    assert not logging.getLogger("lightning.pytorch").handlers and not logging.getLogger("lightning").handlers


def fake_trainer(batches: int, max_epochs: int) -> SimpleNamespace:
    return SimpleNamespace(max_epochs=max_epochs, current_epoch=0, num_training_batches=batches,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=20)))


@pytest.mark.parametrize(("batches", "gpu", "warned"), [(10_000, False, True), (10_000, True, False),
                                                        (10, False, False)])
def test_the_estimate_covers_the_whole_job_and_says_when_it_is_gpu_sized(batches, gpu, warned, caplog,
                                                                          monkeypatch):
    """1 s per step: the pretraining phase's 3 epochs less the 21 steps done, then ALQ's 225 epochs."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: gpu)
    progress = RunProgress("pretraining", JobPlan({"pretraining": 3, "ALQ": 225}))
    with caplog.at_level(logging.INFO, logger="alq_lightning.app"):
        progress.estimate(fake_trainer(batches, 3), 1.0, batches)
    job = 3 * batches - 21 + 225 * batches
    assert (job > GPU_SIZED_S) == (batches == 10_000)
    assert f"{duration(job)} for the whole job's training steps" in caplog.messages[0]
    gpu_sized = [r for r in caplog.records if r.levelno == logging.WARNING and "GPU-sized" in r.getMessage()]
    assert bool(gpu_sized) == warned
