"""Per-epoch time of every ALQ stage relative to a float training epoch, through Lightning.

LeNet5 on the full Fashion-MNIST training split (50 000 images after a 10 000 validation split, batch 128),
in one process with a fixed thread count: one float epoch (the module's own Adam on every parameter), then
an ALQ schedule with one epoch of each stage (basis, coordinate, pruning, STE, final coordinate). Each
epoch's wall time comes from ``on_train_epoch_start``/``end``; ratios divide by the float epoch. ``--compile``
runs the ALQ steps through ``torch.compile`` (its compilation falls in the first epoch of each stage kind, so
that epoch is timed after an untimed warm-up fit of one batch per stage); ``--accelerator gpu`` trains on a GPU.
Writes ``bench/results/stages[_gpu][_compiled].json`` and a table between ``<!-- stages…:begin -->`` and
``<!-- stages…:end -->`` in ``bench/RESULTS.md``.

    python bench/bench_stages.py [--threads 2] [--epochs-float 2] [--compile] [--accelerator cpu|gpu] [--root DIR]
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import date
from functools import partial
from pathlib import Path

import lightning as L
import torch

from alq_lightning import ALQCallback
from alq_lightning.data import FashionMNISTDataModule
from alq_lightning.models import LeNet5, paper_structures
from alq_lightning.module import ClassifierModule

from common import git_state, hardware, write_section

HERE = Path(__file__).resolve().parent


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self.start)


def fit(module: L.LightningModule, data, epochs: int, callbacks: list, accelerator: str, **options) -> list[float]:
    timer = EpochTimer()
    L.Trainer(max_epochs=epochs, callbacks=[*callbacks, timer], accelerator=accelerator, devices=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, limit_val_batches=0, **options).fit(module, data)
    return timer.seconds


def schedule(compile: bool, structures: dict[str, str]) -> ALQCallback:
    return ALQCallback(0.4, max_bits=6, rounds=1, basis_epochs=1, coordinate_epochs=1, pruning_epochs=1,
                       ste_epochs=1, final_coordinate_epochs=1, structures=structures, compile=compile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs-float", type=int, default=2, help="float epochs; the last one is timed")
    parser.add_argument("--compile", action="store_true", help="ALQCallback(compile=True)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--root", help="folder holding the Fashion-MNIST IDX files (default: the usual places)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(0)
    data = FashionMNISTDataModule(root=args.root, batch_size=128, val_size=10000, seed=0, download=False)
    module = ClassifierModule(LeNet5(), num_classes=10, optimizer=partial(torch.optim.Adam, lr=1e-3))
    float_epoch = fit(module, data, args.epochs_float, [], args.accelerator)[-1]

    structures = {f"model.{n}": s for n, s in paper_structures("lenet5", module.model).items()}
    if args.compile:  # compile every kind of step on a copy first: the timed epochs then replay compiled code
        warm = ClassifierModule(LeNet5(), num_classes=10, optimizer=partial(torch.optim.Adam, lr=1e-3))
        fit(warm, data, 5, [schedule(True, structures)], args.accelerator, limit_train_batches=2)
    alq = schedule(args.compile, structures)
    stages = ["basis", "coordinate", "pruning", "STE", "final coordinate"]
    seconds = fit(ClassifierModule(module.model, num_classes=10, optimizer=partial(torch.optim.Adam, lr=1e-3)), data,
                  alq.total_epochs, [alq], args.accelerator)
    rows = [{"stage": "float (Adam)", "seconds": float_epoch, "ratio": 1.0}]
    rows += [{"stage": s, "seconds": t, "ratio": t / float_epoch} for s, t in zip(stages, seconds)]
    suffix = ("_gpu" if args.accelerator == "gpu" else "") + ("_compiled" if args.compile else "")
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    result = {"date": date.today().isoformat(), **git_state(HERE), "cpu": hardware(device), "threads": args.threads,
              "torch": torch.__version__, "model": "LeNet5", "data": "Fashion-MNIST (50k train, batch 128)",
              "compile": args.compile, "accelerator": args.accelerator, "avg_bits_after": alq.network.avg_bits,
              "epochs": rows}
    out = args.out or HERE / "results" / f"stages{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    commit = f"`{(result['git_commit'] or '?')[:7]}`" + (" + uncommitted changes" if result["git_dirty"] else "")
    lines = [f"### ALQ stage epochs vs a float epoch — LeNet5, Fashion-MNIST, {result['cpu']}, "
             f"{args.threads} threads, torch {torch.__version__}, {'compiled ALQ steps, ' if args.compile else ''}"
             f"{result['date']}, commit {commit}", "",
             "| epoch | seconds | × float epoch | authors' code |", "|---|---|---|---|"]
    authors = {"basis": "4.4×"}
    lines += [f"| {r['stage']} | {r['seconds']:.1f} | {r['ratio']:.2f}× | {authors.get(r['stage'], '')} |"
              for r in rows]
    table = "\n".join(lines)
    write_section(args.markdown, f"stages{suffix}", table)
    print(table)


if __name__ == "__main__":
    main()
