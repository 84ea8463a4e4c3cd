"""``trainer=fsdp2``: the app's default job (LeNet5 on Fashion-MNIST, ``experiment=smoke`` slices) sharded on two CPU
processes. Run as a command, as users run it: Lightning's launcher starts the second process by re-running it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alq_lightning import bit_summary
from alq_lightning.models import build_model
from alq_lightning.packed.cli import export_main
from alq_lightning.packed.io import load_packed, read_packed

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_default_job_sharded_on_two_processes(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "train.py", "trainer=fsdp2", "experiment=smoke", "logger=csv",
                           f"paths.output_dir={out}", f"pretrain.cache_dir={tmp_path / 'cache'}",
                           "trainer.enable_progress_bar=false", "extras.print_config=false"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["trainer"]["strategy"]["data_parallel_size"] == 2
    assert 0 < results["avg_bits"] <= results["target_bits"]
    assert results["rounds"][-1]["avg_bits"] <= results["target_bits"]
    assert 0.0 <= results["test_acc"] <= 1.0
    packed = out / "model.alq"
    assert results["packed_file"]["bytes"] == packed.stat().st_size
    model = load_packed(packed, build_model("lenet5", 1, 10, 28))  # the whole model, in one process
    assert bit_summary(model).avg_bits == pytest.approx(results["avg_bits"])
    assert [entry["name"] for entry in read_packed(packed).header["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    assert results["storage_bytes"]["coords32"] == bit_summary(model).storage_bytes
    assert (out / "last.ckpt" / "meta.pt").is_file(), "Lightning's sharded checkpoint"
    assert "alq" in torch.load(out / "last.ckpt" / "meta.pt", weights_only=True)
    # the sharded checkpoint of the fit's end exports, consolidated in memory, to the run's own file
    assert export_main([str(out / "last.ckpt"), str(tmp_path / "from_checkpoint.alq")]) == 0
    assert (tmp_path / "from_checkpoint.alq").read_bytes() == packed.read_bytes()
