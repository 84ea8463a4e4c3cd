"""Accuracy vs average bits on real data: runs ``train.py`` per (seed, target) and aggregates the results.

Each run is ``python train.py experiment=<experiment> seed=<s> alq.target_bits=<t> logger=none`` in its own
directory ``bench/runs/<experiment>[+overrides]/seed<s>_bits<t>/``; a run whose ``results.json`` exists is
reused, so an interrupted study resumes and studies sharing runs (a curve and a multi-seed point) share them.
Writes ``bench/results/<name>.json`` (every run and, per target, mean ± std of test accuracy, bits and
storage), ``bench/results/<name>.png`` (accuracy vs bits, with the authors' measured points for reference where
the experiment is their Fashion-MNIST LeNet5 protocol) and a table in ``bench/RESULTS.md``; on that protocol
both also judge each of the authors' points (:func:`against`).

    python bench/accuracy_vs_bits.py --name lenet5_protocol --experiment fmnist_lenet5_protocol \\
        --seeds 0 1 2 --targets 0.7 0.5 0.39 0.35
    python bench/accuracy_vs_bits.py --name lenet5_protocol_per_bit --seeds 0 1 2 --targets 0.7 0.5 0.39 0.35 \\
        --compare lenet5_protocol -- alq.per_bit=true
    python bench/accuracy_vs_bits.py --name lenet5_curve --experiment fmnist_lenet5_protocol \\
        --targets 2 1 0.7 0.5 0.4 0.35 0.3
    python bench/accuracy_vs_bits.py --name vgg_small_curve --experiment fmnist_vgg_small \\
        --targets 2 1 0.7 0.5 0.4 0.3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

from common import hardware, write_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
AUTHORS = {"fmnist_lenet5_protocol": [(0.881, 91.15), (0.516, 90.99), (0.390, 90.32), (0.353, 90.45)]}


def run(experiment: str, seed: int, target: float, directory: Path, overrides: list[str], threads: int) -> dict:
    """One train.py job (or its earlier results); returns its results.json."""
    results = directory / "results.json"
    if not results.exists():
        command = [sys.executable, str(ROOT / "train.py"), f"experiment={experiment}", f"seed={seed}",
                   f"alq.target_bits={target}", "logger=none", "trainer.enable_progress_bar=false",
                   f"hydra.run.dir={directory}", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
        subprocess.run(command, cwd=ROOT, env=env, check=True)
    return json.loads(results.read_text())


def aggregate(runs: list[dict]) -> list[dict]:
    """Per target: mean and std over seeds of accuracy, bits and storage."""
    rows = []
    for target in sorted({r["target_bits"] for r in runs}, reverse=True):
        group = [r for r in runs if r["target_bits"] == target]

        def stats(values: list[float]) -> tuple[float, float]:
            return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

        columns = {key: [float(r[key]) for r in group] for key in ("test_acc", "float_test_acc", "avg_bits")}
        columns.update({f"{key}_bytes": [float(r["storage_bytes"][key]) for r in group]
                        for key in ("binary", "coords32", "coords16")})
        rows.append({"target_bits": target, "seeds": [r["seed"] for r in group],
                     **{f"{key}_{part}": value for key, values in columns.items()
                        for part, value in zip(("mean", "std"), stats(values))}})
    return rows


def against(rows: list[dict], reference: list[tuple[float, float]]) -> list[dict]:
    """Per reference point ``(bits, accuracy %)``: the study's best mean accuracy at equal or fewer average bits
    and whether it is on or above the point (``best`` is None when no target reaches that few bits)."""
    verdicts = []
    for bits, acc in reference:
        best = max((r for r in rows if r["avg_bits_mean"] <= bits), key=lambda r: r["test_acc_mean"], default=None)
        verdicts.append({"bits": bits, "acc": acc, "met": best is not None and 100 * best["test_acc_mean"] >= acc,
                         "best": best and {k: best[k] for k in ("target_bits", "avg_bits_mean", "test_acc_mean",
                                                              "test_acc_std", "seeds")}})
    return verdicts


def plot(series: dict[str, list[dict]], path: Path, title: str, reference: list[tuple[float, float]]) -> None:
    """One error-bar line per study in ``series`` (label -> its summary rows), plus the authors' points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for label, rows in series.items():
        axes.errorbar([r["avg_bits_mean"] for r in rows], [100 * r["test_acc_mean"] for r in rows],
                      yerr=[100 * r["test_acc_std"] for r in rows], marker="o", capsize=3, label=label)
    if reference:
        bits, acc = zip(*reference)
        axes.scatter(bits, acc, marker="x", color="black", label="authors' code (same protocol)")
    axes.set_xlabel("average bits per weight")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def accuracy(row: dict) -> str:
    """A row's mean test accuracy in percent, with its std when several seeds were run."""
    mean = f"{100 * row['test_acc_mean']:.2f}"
    return f"{mean} ± {100 * row['test_acc_std']:.2f}" if len(row["seeds"]) > 1 else mean


def provenance(runs: list[dict]) -> str:
    """The git commit (recorded in each run's results.json) that each run came from, as ``target/seed`` lists."""
    by_commit: dict[str, list[str]] = {}
    for r in runs:
        commit = f"`{r['git_commit'][:7]}`" if r.get("git_commit") else "unrecorded commit"
        by_commit.setdefault(commit, []).append(f"{r['target_bits']:g}/{r['seed']}")
    return "Runs (target bits/seed) by the commit they ran at: " + "; ".join(
        f"{commit} ({', '.join(items)})" for commit, items in by_commit.items()) + "."


def markdown(name: str, experiment: str, rows: list[dict], runs: list[dict], verdicts: list[dict]) -> str:
    """The study's table for RESULTS.md, the commits of its runs, then the ``verdicts`` of :func:`against`."""
    threads = runs[0].get("hardware", {}).get("torch_threads")
    lines = [f"### {name}: `experiment={experiment}` — {hardware()}, {threads} thread(s) per run, "
             f"{date.today()}", "", provenance(runs), "",
             "| target bits | avg bits | test acc (%) | float test acc (%) | binary | with 32-bit coords | "
             "with 16-bit coords | seeds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target_bits']:g} | {r['avg_bits_mean']:.3f} | {accuracy(r)} | "
                     f"{100 * r['float_test_acc_mean']:.2f} | "
                     f"{r['binary_bytes_mean'] / 1024:.1f} KiB | {r['coords32_bytes_mean'] / 1024:.1f} KiB | "
                     f"{r['coords16_bytes_mean'] / 1024:.1f} KiB | {len(r['seeds'])} |")
    if verdicts:
        lines += ["", "Against the authors' code on the same protocol (one run per point), this study's best mean "
                  "at equal or fewer bits:", ""]
        for v in verdicts:
            best, found = v["best"], "no point"
            if best:
                seeds = ", ".join(map(str, best["seeds"]))
                found = (f"{accuracy(best)} % at {best['avg_bits_mean']:.3f} bits "
                         f"(seed{'s' if len(best['seeds']) > 1 else ''} {seeds})")
            lines.append(f"- {v['acc']:.2f} % at {v['bits']:.3f} bits: {'on or above' if v['met'] else 'BELOW'} "
                         f"— {found}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--experiment", default="fmnist_lenet5_protocol")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.39])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare", nargs="+", default=[], metavar="NAME",
                        help="earlier studies (bench/results/NAME.json) drawn on the same plot")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    out = HERE / "results"
    missing = [name for name in args.compare if not (out / f"{name}.json").exists()]
    if missing:
        parser.error(f"--compare {' '.join(missing)}: no such study in {out} (run it first)")
    compared = {name: json.loads((out / f"{name}.json").read_text())["summary"] for name in args.compare}
    family = "+".join([args.experiment, *args.overrides]).replace("/", "_").replace("=", "-")
    runs = [run(args.experiment, seed, target, HERE / "runs" / family / f"seed{seed}_bits{target:g}",
                args.overrides, args.threads)
            for target in args.targets for seed in args.seeds]
    rows = aggregate(runs)
    out.mkdir(exist_ok=True)
    keep = ("seed", "target_bits", "test_acc", "float_test_acc", "avg_bits", "storage_bytes", "activations",
            "rounds", "timings_s", "git_commit", "hardware")
    reference = AUTHORS.get(args.experiment, [])
    verdicts = against(rows, reference)
    (out / f"{args.name}.json").write_text(json.dumps(
        {"experiment": args.experiment, "overrides": args.overrides, "date": str(date.today()), "summary": rows,
         "authors": verdicts, "runs": [{k: r.get(k) for k in keep} for r in runs]}, indent=2) + "\n")
    plot({args.name: rows, **compared}, out / f"{args.name}.png", args.experiment, reference)
    table = markdown(args.name, args.experiment, rows, runs, verdicts)
    write_section(HERE / "RESULTS.md", f"accuracy:{args.name}", table)
    print(table)


if __name__ == "__main__":
    main()
