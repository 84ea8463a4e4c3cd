"""``python train.py ...`` as a user runs it: the issue's command verbatim, a multirun, and bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def train_py(args: list[str], tmp_path: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "ALQ_CACHE": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_issue_command_verbatim(tmp_path):
    out = tmp_path / "run"
    done = train_py(["model=resnet18", "alq.target_bits=0.7", "experiment=smoke", f"hydra.run.dir={out}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["model"]["name"] == "resnet18" and results["target_bits"] == 0.7
    assert 0 < results["avg_bits"] <= 0.7
    assert results["layers"][0]["shape"] == "64x1x3x3"  # 1-channel 28x28 Fashion-MNIST, small-input stem
    assert "avg bits" in done.stdout and "model.layer4.1.conv2" in done.stdout
    assert list((out / "wandb").glob("offline-run-*"))


def test_multirun_gives_each_job_its_own_offline_run(tmp_path):
    sweep = tmp_path / "sweep"
    done = train_py(["-m", "experiment=smoke", "alq.target_bits=1,0.5", f"hydra.sweep.dir={sweep}",
                     "trainer.enable_progress_bar=false"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert len(runs) == 2 and runs[0].parent.parent != runs[1].parent.parent
    targets = sorted(json.loads(p.read_text())["target_bits"] for p in sweep.glob("*/results.json"))
    assert targets == [0.5, 1.0]
    pretrained = [json.loads(p.read_text())["pretrained"]["source"] for p in sorted(sweep.glob("*/results.json"))]
    assert pretrained == ["trained", "cache"]


@pytest.mark.parametrize("args,message", [
    (["model=alexnet"], "Could not find 'model/alexnet'"),
    (["alq.target_bits=7"], "alq: target_bits=7 must be a number in (0, max_bits=6)"),
])
def test_bad_input_fails_clearly_without_results(args, message, tmp_path):
    out = tmp_path / "run"
    done = train_py(["experiment=smoke", f"hydra.run.dir={out}", *args], tmp_path, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr
    assert not (out / "results.json").exists()
    assert not list(out.glob("wandb/offline-run-*")), "no W&B run for a config that cannot run"
