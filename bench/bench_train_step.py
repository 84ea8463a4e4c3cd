"""A whole ALQ training step against a whole float training step, eager and compiled, on a CPU or a GPU.

For each model (paper structures and max_bits, batch 128 of random data) in one process:

- float step: forward, cross-entropy, backward, ``Adam(foreach=True)`` over every parameter;
- ALQ basis / STE / coordinate step: forward, cross-entropy, backward, the stage's update of the quantized
  weights (gather the gradients, the bucket step, write ŵ) and the same Adam over the other parameters;
  eager, and with ``compile=True`` (``torch.compile``; on CUDA a CUDA graph) after its compilation.

Times are medians of ``--repeats`` steps after warm-ups, with the device synchronised around each step. Writes
``bench/results/train_step_<device>.json`` and a table between ``<!-- train_step_<device>:begin/end -->`` in
``bench/RESULTS.md``.

    python bench/bench_train_step.py [--device cpu|cuda] [--models vgg_small resnet20] [--repeats 10]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from alq_lightning.layers import LayerSelection, attach
from alq_lightning.models import PAPER_MAX_BITS, build_model, paper_structures
from alq_lightning.network import MultiBitNetwork

from common import git_state, hardware, write_section

HERE = Path(__file__).resolve().parent
MODELS = {"lenet5": (1, 28, 10), "vgg_small": (3, 32, 10), "resnet20": (3, 32, 10), "resnet18": (3, 224, 1000)}
KINDS = ("basis", "ste", "coordinate")
LR = 1e-3


def median_seconds(step, device: torch.device, repeats: int, warmups: int) -> float:
    times = []
    for index in range(warmups + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmups:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor,
                  network: MultiBitNetwork | None = None, kind: str = "basis"):
    """One training step: forward, backward, the ALQ update of ``kind`` (with a network), the optimizer."""
    def step() -> None:
        nn.functional.cross_entropy(model(inputs), labels).backward()
        if network is not None:
            getattr(network, f"{kind}_step")(network.take_grads(), LR)
        optimizer.step()
        optimizer.zero_grad()

    return step


def bench_model(name: str, device: torch.device, batch_size: int, repeats: int) -> dict:
    channels, size, classes = MODELS[name]
    torch.manual_seed(0)
    inputs = torch.randn(batch_size, channels, size, size, device=device)
    labels = torch.randint(classes, (batch_size,), device=device)

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = build_model(name, channels, classes, size).to(device).train()
        return model, torch.optim.Adam(model.parameters(), lr=LR, foreach=True)

    step = training_step(*fresh(), inputs, labels)
    result = {"float_step_s": median_seconds(step, device, repeats, warmups=3), "alq": {}}
    for compiled in (False, True):
        model, optimizer = fresh()
        selection = LayerSelection(max_bits=PAPER_MAX_BITS[name], structures=paper_structures(name, model))
        network = MultiBitNetwork(*attach(model, selection), compile=compiled)
        network.initialize()
        for kind in KINDS:
            if kind == "ste":
                network.start_ste()
            step = training_step(model, optimizer, inputs, labels, network, kind)
            seconds = median_seconds(step, device, repeats, warmups=3)
            result["alq"][f"{kind}{' compiled' if compiled else ''}"] = {
                "seconds": seconds, "ratio": seconds / result["float_step_s"]}
    return result


def table(run: dict) -> str:
    device = run["device"]
    lines = [
        f"## Training step, ALQ vs float ({device})",
        "",
        f"`python bench/bench_train_step.py --device {device}`, {run['hardware']}, torch {run['torch']}, batch "
        f"{run['batch_size']}, {run['date'][:10]}, commit `{(run['git_commit'] or '?')[:7]}`"
        f"{' + uncommitted changes' if run['git_dirty'] else ''}. A step is forward, backward and update; ALQ "
        "updates the quantized weights (gather, bucket step, write ŵ) and Adam the rest. Ratios divide by the "
        "float Adam step.",
        "",
        "| model | float Adam step | " + " | ".join(f"{k} | {k} compiled" for k in KINDS) + " |",
        "|---|---|" + "---|" * (2 * len(KINDS)),
    ]
    for name, r in run["models"].items():
        cells = [f"{r['alq'][key]['ratio']:.2f}×" for kind in KINDS for key in (kind, f"{kind} compiled")]
        lines.append(f"| {name} | {r['float_step_s'] * 1e3:.2f} ms | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["lenet5", "vgg_small", "resnet20"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run = {"date": datetime.now().isoformat(timespec="seconds"), **git_state(HERE), "device": args.device,
           "hardware": hardware(device), "torch": torch.__version__, "batch_size": args.batch_size,
           "models": {name: bench_model(name, device, args.batch_size, args.repeats) for name in args.models}}
    out = args.out or HERE / "results" / f"train_step_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(run, indent=1) + "\n")
    write_section(args.markdown, f"train_step_{args.device}", table(run))
    print(table(run))


if __name__ == "__main__":
    main()
