"""ATen ops (≈ kernel launches on a GPU) and host synchronisations per ALQ step, next to a float step.

For LeNet5, VGG-small, ResNet-20 and ResNet-18 with the paper's structures and max_bits, on a CPU and a
small random batch, a ``TorchDispatchMode`` counts every ATen op dispatched (views included) by

- the float step: forward + cross-entropy + backward, and ``Adam(foreach=True).step()`` over every parameter;
- the ALQ update a stage runs in ``on_before_optimizer_step`` — taking the quantized weights' gradients,
  the non-finite check, the basis / STE / coordinate step and writing ŵ back into the weights — with the
  gradients of one real backward pass, after one uncounted call (so lazily built constants are not counted).

The ALQ step is counted as it runs on a GPU: each bucket in one block. On a CPU a bucket is processed in blocks
of about 2^18 weights to stay in cache, which repeats the block's ops once per block (a CPU is not bound by
launches).

A host synchronisation is an op that reads a tensor's value into Python (``aten._local_scalar_dense``: ``item``,
``bool``, ``int``), checks a solver's status (``_linalg_check_errors``) or sizes its output by the data
(``nonzero``, ``masked_select``); on a GPU each one stalls the launch queue. The count does not depend on the batch
size or the machine; the numbers are exact for the code at the recorded commit.

    python bench/bench_launches.py            # writes bench/results/launches.json and a table in RESULTS.md
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from alq_lightning import buckets
from alq_lightning.layers import LayerSelection, attach
from alq_lightning.models import PAPER_MAX_BITS, build_model, paper_structures
from alq_lightning.network import MultiBitNetwork

from common import git_state, hardware, write_section

HERE = Path(__file__).resolve().parent
MODELS = {"lenet5": (1, 28, 10), "vgg_small": (3, 32, 10), "resnet20": (3, 32, 10), "resnet18": (3, 64, 1000)}
SYNC_OPS = ("_local_scalar_dense", "_linalg_check_errors", "nonzero", "masked_select")
LR, BAR = 1e-3, 2.0


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the ``with`` block, by overload packet name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def syncs(self) -> int:
        return sum(self.ops[name] for name in SYNC_OPS)


def count(fn: Callable[[], object]) -> OpCounter:
    with OpCounter() as counter:
        fn()
    return counter


def alq_update(network: MultiBitNetwork, grads: dict[str, torch.Tensor], kind: str) -> OpCounter:
    """Ops of what a stage does with the gradients ``grads`` left on the quantized weights (see ``ALQStage``)."""
    step = {"basis": network.basis_step, "ste": network.ste_step, "coordinate": network.coordinate_step}[kind]

    def update() -> None:
        step(network.take_grads(), LR)

    for _ in range(2):  # the first call builds what later steps reuse
        for name, layer in network.layers.items():
            layer.param.grad = grads[name].clone()
        counter = count(update)
    return counter


def bench_model(name: str, batch_size: int) -> dict:
    channels, size, classes = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name, channels, classes, size).train()
    inputs, labels = torch.randn(batch_size, channels, size, size), torch.randint(classes, (batch_size,))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, foreach=True)

    def forward_backward() -> None:
        nn.functional.cross_entropy(model(inputs), labels).backward()

    forward_backward()
    optimizer.step()  # Adam's state exists from here on, as in every later step
    float_ops = {"forward_backward": count(forward_backward).total, "adam_foreach": count(optimizer.step).total}
    float_ops["float_step"] = float_ops["forward_backward"] + float_ops["adam_foreach"]
    model.zero_grad()

    structures = paper_structures(name, model)
    layers, float_layers = attach(model, LayerSelection(max_bits=PAPER_MAX_BITS[name], structures=structures))
    network = MultiBitNetwork(layers, float_layers)
    network.initialize()
    forward_backward()
    grads = {key: layer.param.grad.detach().clone() for key, layer in network.layers.items()}
    model.zero_grad()
    result: dict = {"layers": len(layers), "max_bits": PAPER_MAX_BITS[name], **float_ops, "alq": {}}
    for kind in ("basis", "ste", "coordinate"):
        if kind == "ste":
            network.start_ste()
        counter = alq_update(network, grads, kind)
        result["alq"][kind] = {"ops": counter.total, "syncs": counter.syncs,
                               "ratio": round(counter.total / float_ops["float_step"], 2),
                               "top_ops": dict(counter.ops.most_common(8))}
    return result


def table(run: dict) -> str:
    lines = [
        "## Kernel launches per step (ATen ops, CPU count)",
        "",
        f"`python bench/bench_launches.py`, {run['date'][:10]}, commit `{(run['git_commit'] or '?')[:7]}`"
        f"{' + uncommitted changes' if run['git_dirty'] else ''}, torch {run['torch']}: ATen ops dispatched "
        "(views included; ≈ kernel launches on a GPU) and host syncs, the ALQ step in one block per bucket as on a "
        "GPU. The ALQ update is what a stage runs in place "
        f"of the optimizer for the quantized weights; bar: ≤ {BAR:g}× the whole float step (forward + backward + "
        "Adam foreach), 0 syncs.",
        "",
        "| model (layers) | forward + backward | Adam (foreach) | basis | STE | coordinate | syncs per step | "
        f"≤ {BAR:g}× float step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in run["models"].items():
        alq = r["alq"]
        cells = [f"{alq[k]['ops']:,} ({alq[k]['ratio']:.1f}×)" for k in ("basis", "ste", "coordinate")]
        syncs = max(alq[k]["syncs"] for k in alq)
        met = all(alq[k]["ratio"] <= BAR for k in alq) and syncs == 0
        lines.append(f"| {name} ({r['layers']}) | {r['forward_backward']} | {r['adam_foreach']} | "
                     f"{' | '.join(cells)} | {syncs} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "launches.json")
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    buckets.BLOCK.clear()  # one block per bucket, as on a GPU
    run = {"date": datetime.now().isoformat(timespec="seconds"), **git_state(HERE), "torch": torch.__version__,
           "hardware": hardware("cpu"), "batch_size": args.batch_size,
           "models": {name: bench_model(name, args.batch_size) for name in args.models}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(run, indent=1) + "\n")
    write_section(args.markdown, "launches", table(run))
    print(table(run))


if __name__ == "__main__":
    main()
