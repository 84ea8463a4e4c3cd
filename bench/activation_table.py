"""Weights × inputs: test accuracy, storage and binary operations of multi-bit networks, from accuracy studies.

Reads the studies that ``accuracy_vs_bits.py`` wrote for one experiment: ``<name>_weights_only`` (float inputs;
``--weights-only`` names another) and ``<name>_act<J>_start`` (``-- alq.act_bits=J alq.act_start=start``) for
J = 1, 2, 3, and lays their seed-mean test accuracies out as one row per weight target that some input study ran
and one column per input bitwidth, with the storage of the quantized layers (32-bit coordinates) and the BOPs per
sample (MACs × live weight bases × input bases) beside the float MACs of the same layers. Writes the table between
``<!-- activations_<name>:begin -->`` and ``<!-- activations_<name>:end -->`` in ``bench/RESULTS.md`` and prints it.

    python bench/activation_table.py --name lenet5_protocol
    python bench/activation_table.py --name vgg_small --weights-only vgg_small_curve
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import write_section

HERE = Path(__file__).resolve().parent
INPUT_BITS = (1, 2, 3)


def load(folder: Path, name: str) -> dict[float, list[dict]]:
    """``{target bits: runs}`` of the study ``name`` in ``folder`` (empty when it was not run)."""
    path = folder / f"{name}.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    by_target: dict[float, list[dict]] = {}
    for run in runs:
        by_target.setdefault(run["target_bits"], []).append(run)
    return by_target


def cell(runs: list[dict] | None) -> str:
    """Mean test accuracy (± std over seeds) and, with quantized inputs, the mean BOPs in millions per sample."""
    if not runs:
        return "—"
    acc = [100 * r["test_acc"] for r in runs]
    text = f"{statistics.fmean(acc):.2f}" + (f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else "")
    counts = [r["activations"]["bops"] for r in runs if r.get("activations")]
    return f"{text} % ({statistics.fmean(counts) / 1e6:.1f} M)" if counts else f"{text} %"


def table(name: str, weights_only: str, folder: Path = HERE / "results") -> str:
    """The markdown table of the studies of ``name`` (and ``weights_only``) in ``folder``."""
    studies = {0: load(folder, weights_only), **{b: load(folder, f"{name}_act{b}_start") for b in INPUT_BITS}}
    targets = sorted({t for bits, study in studies.items() if bits for t in study}, reverse=True)
    if not targets:
        raise SystemExit(f"no input study of {name!r} ({name}_act<J>_start.json) in {folder}")
    every = [r for study in studies.values() for runs in study.values() for r in runs]
    seeds = sorted({r["seed"] for r in every})
    float_acc = statistics.fmean(r["float_test_acc"] for r in every)
    macs = next((r["activations"]["macs"] for r in every if r.get("activations")), None)
    float_inputs = "float inputs" + (f" ({macs / 1e6:.1f} M MACs)" if macs else "")
    lines = [f"Test accuracy (%) and, in brackets, millions of binary operations per sample in the layers with "
             f"quantized inputs (every quantized layer but the first), against their float multiply-accumulates "
             f"(MACs); storage of the quantized layers with 32-bit coordinates; seeds {', '.join(map(str, seeds))}.",
             "", f"| weights | storage | {float_inputs} | " + " | ".join(f"{b}-bit inputs" for b in INPUT_BITS)
             + " |", "|---|---|---|" + "---|" * len(INPUT_BITS),
             f"| float32 | {every[0]['storage_bytes']['float32'] / 1024:.1f} KiB | {100 * float_acc:.2f} % |"
             + " — |" * len(INPUT_BITS)]
    for target in targets:
        runs = [r for study in studies.values() for r in study.get(target, [])]
        bits = statistics.fmean(r["avg_bits"] for r in runs)
        storage = statistics.fmean(r["storage_bytes"]["coords32"] for r in runs) / 1024
        row = [cell(studies[0].get(target)), *(cell(studies[b].get(target)) for b in INPUT_BITS)]
        lines.append(f"| {bits:.3f} bits | {storage:.1f} KiB | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="study prefix, e.g. lenet5_protocol")
    parser.add_argument("--weights-only", help="the float-input study (default: <name>_weights_only)")
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    text = table(args.name, args.weights_only or f"{args.name}_weights_only")
    write_section(args.markdown, f"activations_{args.name}", f"### Weights × inputs: {args.name}\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
