"""Benchmark of the ALQ math core: initialisation time, per-step work and basis-step memory.

For LeNet5 (1×28×28), VGG-small (3×32×32) and ResNet-18 (3×224×224), with the paper's structures and
max_bits, in one process at a fixed thread count, on a random batch:

1. float reference: median time of one plain ``torch.optim.Adam`` training step (forward, cross-entropy,
   backward, step, zero_grad) after warm-ups; a model whose step takes over 5 s gets one warm-up and at
   most 2 timed runs;
2. ``MultiBitNetwork.initialize()``: median of up to 3 runs, each from the same float weights;
3. ALQ work per step, forward/backward excluded, with the real gradients of one backward pass:
   ``basis_step``, ``coordinate_step``, ``ste_step`` and pruning (``observe`` + ``prune_slots`` of 0.5 % of
   the binary bits, state restored between runs), as medians and as ratios to the float step;
4. extra memory of one basis step: CUDA allocator peak above the memory allocated before, or on a CPU the
   peak resident set (VmHWM, reset via ``/proc/self/clear_refs``) above the resident set before; next to
   it the N·2^K float32 table a brute-force pattern search holds. MB = 10^6 bytes.

Appends the run (with its git commit) to the ``runs`` list of a JSON file, keeping every earlier run, and writes
a table of the latest run plus one line per kept run between markers in ``bench/RESULTS.md``. Absolute times
depend on the machine and its load: compare the ratios measured in one run.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from alq_lightning.layers import LayerSelection, attach
from alq_lightning.models import PAPER_MAX_BITS, build_model, paper_structures
from alq_lightning.network import MultiBitNetwork

from common import git_state, hardware, proc_field, write_section

MODELS = {"lenet5": (1, 28, 10), "vgg_small": (3, 32, 10), "resnet18": (3, 224, 1000)}  # channels, size, classes
LR, PRUNE_FRACTION, SLOW_STEP_S = 1e-3, 0.005, 5.0
STEPS = ("basis", "coordinate", "ste", "prune")
HERE = Path(__file__).resolve().parent


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn, device: torch.device, repeats: int, warmups: int = 1, before=None) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmups`` untimed ones; ``before()`` runs untimed."""
    times = []
    for run in range(warmups + repeats):
        if before is not None:
            before()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if run >= warmups:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def float_step_seconds(model: nn.Module, batch, device: torch.device, repeats: int) -> tuple[float, int, bool]:
    """Median seconds of one float Adam training step, the number of timed runs, whether a step is slow."""
    inputs, labels = batch
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def step() -> None:
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        optimizer.zero_grad()

    slow = time_runs(step, device, repeats=1, warmups=0) > SLOW_STEP_S
    repeats = min(repeats, 2) if slow else repeats
    return time_runs(step, device, repeats, warmups=int(not slow)), repeats, slow


def extra_memory_mb(fn, device: torch.device) -> float | None:
    """Peak memory of ``fn()`` above the memory in use before it, in MB (None if it cannot be measured)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 1e6
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the baseline is what is in use
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        before = int(proc_field("/proc/self/status", "VmRSS").split()[0])
        fn()
        return (int(proc_field("/proc/self/status", "VmHWM").split()[0]) - before) * 1024 / 1e6
    except (OSError, StopIteration):
        return None


def bench_model(name: str, args, device: torch.device) -> dict:
    channels, size, classes = MODELS[name]
    max_bits = PAPER_MAX_BITS[name]
    torch.manual_seed(0)
    model = build_model(name, channels, classes, size).to(device).train()
    batch = (torch.randn(args.batch_size, channels, size, size, device=device),
             torch.randint(classes, (args.batch_size,), device=device))
    float_s, float_repeats, slow = float_step_seconds(model, batch, device, args.repeats)

    layers, float_layers = attach(model, LayerSelection(max_bits=max_bits, structures=paper_structures(name, model)))
    network = MultiBitNetwork(layers, float_layers)
    float_weights = {key: layer.module.weight.detach().clone() for key, layer in layers.items()}

    def restore_float() -> None:
        for key, layer in layers.items():
            layer.module.weight.data.copy_(float_weights[key])

    init_s = time_runs(network.initialize, device, min(args.repeats, 3), warmups=int(not slow), before=restore_float)
    init_bits = network.avg_bits

    model.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    grads = {key: layer.grad_groups().clone() for key, layer in layers.items()}
    model.zero_grad()

    def step(kind: str):
        return lambda: getattr(network, f"{kind}_step")(network.load_grads(grads), LR)

    seconds = {"basis": time_runs(step("basis"), device, args.repeats)}
    memory_mb = extra_memory_mb(step("basis"), device)  # after a warm-up
    seconds["coordinate"] = time_runs(step("coordinate"), device, args.repeats)
    network.start_ste()
    seconds["ste"] = time_runs(step("ste"), device, args.repeats)
    saved, scalars = network.state_tensors(), network.scalars()
    prune_bits = PRUNE_FRACTION * network.binary_bits

    def restore_state() -> None:
        network.load_state_tensors(saved)
        network.load_scalars(scalars)
        network.bound()  # binding after a load happens once, not at every step

    def prune() -> None:
        network.observe(network.load_grads(grads))
        network.prune_slots(prune_bits, LR)

    seconds["prune"] = time_runs(prune, device, args.repeats, before=restore_state)
    return {
        "input": [channels, size, size], "num_classes": classes, "max_bits": max_bits,
        "num_weights": network.numel, "avg_bits_after_init": init_bits,
        "float_step_s": float_s, "float_step_repeats": float_repeats, "slow_float_step": slow, "init_s": init_s,
        "steps": {key: {"seconds": s, "ratio": s / float_s} for key, s in seconds.items()},
        "worst_step_ratio": max(s / float_s for s in seconds.values()),
        "basis_extra_memory_mb": memory_mb,
        "authors_table_mb": network.numel * 2**max_bits * 4 / 1e6,
    }


def duration(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def megabytes(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f} MB"


SHOW = {"init_s": duration, "worst_step_ratio": lambda v: f"{v:.3f}×", "basis_extra_memory_mb": megabytes}
# (model, quantity, result key, limit, target, the authors' code)
TARGETS = [
    ("vgg_small", "initialisation", "init_s", 1.0, "< 1 s", "30 s"),
    ("resnet18", "initialisation", "init_s", 3.0, "< 3 s", "—"),
    ("vgg_small", "ALQ work per step, slowest phase", "worst_step_ratio", 0.3, "≤ 0.3× float step", "basis 5.5×"),
    ("resnet18", "ALQ work per step, slowest phase", "worst_step_ratio", 0.3, "≤ 0.3× float step",
     "basis 4.4–5.5× (LeNet5, VGG-small)"),
    ("resnet18", "basis-step extra memory (max_bits 8)", "basis_extra_memory_mb", 1000.0, "< 1 GB", None),
]


def load_runs(path: Path) -> list[dict]:
    """The runs kept in ``path``: its ``runs`` list (a file from before the list is one run); [] when absent."""
    if not path.exists():
        return []
    stored = json.loads(path.read_text())
    return stored["runs"] if "runs" in stored else [stored]


def commit_label(run: dict) -> str:
    """The run's commit (short), flagged when the working tree had changes; an inferred one says so."""
    if run.get("git_commit"):
        return f"`{run['git_commit'][:7]}`" + (" + uncommitted changes" if run.get("git_dirty") else "")
    inferred = run.get("inferred_git_commit")
    return f"`{inferred[:7]}` (inferred)" if inferred else "not recorded"


def history(runs: list[dict]) -> list[str]:
    """One table row per kept run and model: date, commit, threads, float step, init, basis and slowest ratios."""
    lines = ["| date | commit | threads | model | float Adam step | init | basis | slowest phase |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        commit = commit_label(run)
        for name, r in run["models"].items():
            lines.append(f"| {run['date']} | {commit} | {run['threads']} | {name} | {duration(r['float_step_s'])} "
                         f"| {duration(r['init_s'])} | {r['steps']['basis']['ratio']:.3f}× "
                         f"| {r['worst_step_ratio']:.3f}× |")
    return lines


def markdown(results: dict, runs: list[dict] | None = None) -> str:
    """The results as a measurement table, a target table and notes, then every kept run of the same device."""
    models = results["models"]
    lines = [f"## ALQ core ({results['device'].upper()})", "",
             f"{results['hardware']}, {results['threads']} threads, torch {results['torch']}, "
             f"batch {results['batch_size']}, {results['date']}.", "",
             "| model | weights | max_bits | float Adam step | init | basis | coordinate | STE | pruning "
             "| basis extra memory | N·2^K table |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in models.items():
        steps = " | ".join(f"{r['steps'][k]['ratio']:.3f}× ({duration(r['steps'][k]['seconds'])})" for k in STEPS)
        lines.append(f"| {name} | {r['num_weights']:,} | {r['max_bits']} | {duration(r['float_step_s'])} "
                     f"| {duration(r['init_s'])} | {steps} | {megabytes(r['basis_extra_memory_mb'])} "
                     f"| {megabytes(r['authors_table_mb'])} |")
    lines += ["", "Step columns: ratio to the float Adam step (time). Pruning = `observe` + `prune_slots` of 0.5 % "
              "of the binary bits.", "",
              "| model | quantity | target | measured | met? | authors' code |", "|---|---|---|---|---|---|"]
    for name, quantity, key, limit, target, authors in TARGETS:
        if name in models:
            value = models[name][key]
            met = "n/a" if value is None else ("yes" if value <= limit else "**no**")
            authors = authors or f"{megabytes(models[name]['authors_table_mb'])} table"
            lines.append(f"| {name} | {quantity} | {target} | {SHOW[key](value)} | {met} | {authors} |")
    notes = [f"{name}: a float step took over {SLOW_STEP_S:g} s, so the float step is the median of "
             f"{r['float_step_repeats']} run(s) and initialisation had no warm-up."
             for name, r in models.items() if r["slow_float_step"]]
    lines += ([""] + notes) if notes else []
    kept = [run for run in runs or [results] if run["device"] == results["device"]]
    lines += ["", f"Every kept {results['device'].upper()} run ({len(kept)}, oldest first; `runs` in the JSON file):",
              "", *history(kept)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "core.json")
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1 or args.batch_size < 1:
        parser.error("--repeats, --threads and --batch-size must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {"hardware": hardware(device), "device": args.device, "threads": args.threads,
               "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
               **git_state(), "batch_size": args.batch_size, "repeats": args.repeats, "models": {}}
    for name in args.models:
        print(f"benchmarking {name} ...", flush=True)
        results["models"][name] = bench_model(name, args, device)
    runs = [*load_runs(args.out), results]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    section = markdown(results, runs)
    write_section(args.markdown, "core-gpu" if args.device == "cuda" else "core", section)
    print(section)
    print(f"wrote {args.out} and {args.markdown}")


if __name__ == "__main__":
    main()
