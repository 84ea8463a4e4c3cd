"""Whether the code at another commit computes bit for bit what the working tree computes.

    python bench/same_results.py 2d18cc0      # prints "identical" or the tensors that differ; exit 0 / 1

It runs the same short ALQ schedule on LeNet5 (a 1,024-image slice of Fashion-MNIST, every stage: basis,
coordinate and pruning epochs over two rounds, STE, final coordinates; one thread, deterministic) with the
working tree and with the commit (checked out in a temporary ``git worktree``), and compares the final model
weights and multi-bit state. Stored results from the commit still describe the current code when they match.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = r'''
import sys
from functools import partial

import lightning as L
import torch
from alq_lightning import ALQCallback
from alq_lightning.data import FashionMNISTDataModule
from alq_lightning.models import LeNet5
from alq_lightning.module import ClassifierModule

torch.set_num_threads(1)
L.seed_everything(0)
data = FashionMNISTDataModule(batch_size=128, val_size=256, train_limit=1024, test_limit=256)
module = ClassifierModule(LeNet5(), num_classes=10, optimizer=partial(torch.optim.Adam, lr=1e-3))
alq = ALQCallback(0.7, max_bits=4, rounds=2, basis_epochs=1, coordinate_epochs=1, ste_epochs=1,
                  final_coordinate_epochs=1)
L.Trainer(max_epochs=alq.total_epochs, callbacks=[alq], logger=False, enable_checkpointing=False,
          enable_progress_bar=False, enable_model_summary=False, deterministic=True, accelerator="cpu").fit(
    module, data)
state = {key: value.clone() for key, value in module.state_dict().items()}
for name, layer in alq.network.layers.items():
    for key in ("codes", "coords", "mask", "weight_m", "weight_v", "weight_vmax", "coord_m", "coord_v", "coord_vmax"):
        state[f"{name}/{key}"] = layer.buffer(key).clone()
torch.save(state, sys.argv[1])
'''


def run(source: Path, out: Path) -> dict[str, torch.Tensor]:
    """The final state of the schedule with the package found under ``source``."""
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", RUN, str(out)], cwd=source, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return torch.load(out, weights_only=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("commit", help="the commit to compare with the working tree")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            before = run(tree, Path(scratch) / "before.pt")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
        now = run(ROOT, Path(scratch) / "now.pt")
    differ = sorted(set(before) ^ set(now)) + [k for k in sorted(set(before) & set(now))
                                                 if not torch.equal(before[k], now[k])]
    print("identical" if not differ else f"{len(differ)} tensors differ: {differ[:8]}")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
