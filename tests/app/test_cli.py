"""``python train.py ...`` as a user runs it: the issue's command verbatim, a multirun, and bad input."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import hydra.core.utils as hydra_utils
import pytest
import yaml
from hydra import compose, initialize_config_dir

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
    assert results["config"]["model"]["net"]["_target_"] == "alq_lightning.models.ResNet18"
    assert results["target_bits"] == 0.7
    assert 0 < results["avg_bits"] <= 0.7
    assert results["layers"][0]["shape"] == "64x1x3x3"  # 1-channel 28x28 Fashion-MNIST, small-input stem
    assert "avg bits" in done.stdout and "model.layer4.1.conv2" in done.stdout
    assert list((out / "wandb").glob("offline-run-*"))


def test_multirun_gives_each_job_its_own_offline_run(tmp_path):
    pattern = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())["hydra"]["sweep"]["dir"]
    done = train_py(["-m", "experiment=smoke", "alq.target_bits=1,0.5", f"hydra.sweep.dir={tmp_path}/{pattern}",
                     "trainer.enable_progress_bar=false"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")  # one sweep folder for both jobs: one time stamp and token
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    runs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert len(runs) == 2 and runs[0].parent.parent != runs[1].parent.parent
    targets = sorted(json.loads(p.read_text())["target_bits"] for p in sweep.glob("*/results.json"))
    assert targets == [0.5, 1.0]
    pretrained = [json.loads(p.read_text())["pretrained"]["source"] for p in sorted(sweep.glob("*/results.json"))]
    assert pretrained == ["trained", "cache"]
    with open(sweep / "sweep.csv") as handle:  # the sweep's curve, by average bits
        rows = list(csv.DictReader(handle))
    jobs = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert [row["job"] for row in rows] == sorted(jobs, key=lambda job: jobs[job]["avg_bits"])
    for row in rows:
        results = jobs[row["job"]]
        assert float(row["avg_bits"]) == results["avg_bits"] and float(row["test_acc"]) == results["test_acc"]
        assert int(row["file_bytes"]) == results["packed_file"]["bytes"]
    assert (sweep / "sweep_accuracy.png").stat().st_size > 0


def test_runs_started_at_the_same_instant_get_their_own_folders(monkeypatch):
    sys.path.insert(0, str(ROOT))
    import train  # noqa: F401  (registers the run_token resolver, as `python train.py` does)

    instant = datetime(2030, 1, 2, 3, 4, 5, 678901)
    monkeypatch.setattr(hydra_utils, "datetime", SimpleNamespace(now=lambda: instant))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        first, second = (compose("config", return_hydra_config=True) for _ in range(2))
    assert first.hydra.run.dir.startswith("outputs/2030-01-02/03-04-05-678901-")  # paths.log_dir
    assert first.hydra.run.dir == first.hydra.run.dir != second.hydra.run.dir
    assert first.hydra.sweep.dir.startswith("multirun/2030-01-02/03-04-05-678901-")
    assert first.hydra.sweep.dir != second.hydra.sweep.dir


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
