"""Plots (per-layer bits, accuracy vs bits over rounds) as PNGs, and their W&B tables and images."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger

from alq_lightning.app.loggers import is_wandb
from alq_lightning.summary import BitSummary


def plot_layer_bits(results: dict[str, Any], path: Path) -> Path:
    """Bar chart of the average bits of every quantized layer, with the target as a dashed line."""
    from matplotlib.figure import Figure

    names, bits = list(results["layer_bits"]), list(results["layer_bits"].values())
    fig = Figure(figsize=(max(6.0, 0.35 * len(names) + 2), 4), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(names)), bits, color="tab:blue")
    ax.axhline(results["target_bits"], color="tab:red", linestyle="--", label=f"target {results['target_bits']:g}")
    ax.axhline(results["avg_bits"], color="black", linestyle=":", label=f"average {results['avg_bits']:.3f}")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("average bits per weight")
    ax.set_title("ALQ bits per layer")
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def plot_accuracy_vs_bits(results: dict[str, Any], path: Path) -> Path:
    """Validation accuracy at each round's end against its average bits, the final test point, and the
    float model's test accuracy."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    rounds = [r for r in results["rounds"] if r.get("val_acc") is not None]
    if rounds:
        ax.plot([r["avg_bits"] for r in rounds], [100 * r["val_acc"] for r in rounds], "o-", label="val, round end")
        for r in rounds:
            ax.annotate(f"r{r['round']}", (r["avg_bits"], 100 * r["val_acc"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    if results.get("test_acc") is not None:
        ax.plot([results["avg_bits"]], [100 * results["test_acc"]], "*", markersize=12, label="test, final")
    if results.get("float_test_acc") is not None:
        ax.axhline(100 * results["float_test_acc"], color="gray", linestyle="--", label="float test")
    ax.invert_xaxis()
    ax.set_xlabel("average bits per weight")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs bits over ALQ rounds")
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def save_plots(results: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Both plots as PNGs in ``folder``; none (with a warning) when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        warnings.warn("matplotlib is not installed (pip install alq_lightning[plot]): no plots written", stacklevel=2)
        return {}
    return {"layer_bits": plot_layer_bits(results, folder / "layer_bits.png"),
            "accuracy_vs_bits": plot_accuracy_vs_bits(results, folder / "accuracy_vs_bits.png")}


def packed_model_metadata(results: dict[str, Any]) -> dict[str, Any]:
    """What a W&B model artifact of ``model.alq`` carries: bits, bytes, accuracies."""
    return {"avg_bits": results["avg_bits"], "target_bits": results["target_bits"],
            "storage_bytes": results["storage_bytes"]["coords32"], "file_bytes": results["packed_file"]["bytes"],
            "val_acc": results.get("val_acc"), "test_acc": results["test_acc"],
            "float_test_acc": results["float_test_acc"]}


def log_packed_model(run: Any, path: Path, results: dict[str, Any]) -> None:
    """``model.alq`` at ``path`` as a W&B model artifact of ``run`` (named ``alq-<run id>``)."""
    import wandb

    artifact = wandb.Artifact(f"alq-{run.id}", type="model", metadata=packed_model_metadata(results),
                              description=f"ALQ model at {results['avg_bits']:.4f} bits per weight (alq_lightning "
                                          "packed format; load_packed)")
    artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact)


def publish(loggers: list[Logger], summary: BitSummary, results: dict[str, Any], plots: dict[str, Path],
            packed: Path | None = None) -> None:
    """Final numbers into every logger; for W&B also the bit summary and rounds as tables and the plots, and the
    packed model ``packed`` as a model artifact where ``logger.wandb.log_packed_model`` is on."""
    final = {"final/test_acc": results["test_acc"], "final/val_acc": results.get("val_acc"),
             "final/float_test_acc": results["float_test_acc"], "final/avg_bits": results["avg_bits"],
             "final/storage_bytes": results["storage_bytes"]["coords32"],
             "final/bops": (results.get("activations") or {}).get("bops")}
    final = {k: v for k, v in final.items() if v is not None}
    for logger in loggers:
        logger.log_metrics({k: float(v) for k, v in final.items()})
        if not is_wandb(logger):
            continue
        import wandb

        run = logger.experiment
        rounds = [[r["round"], r["epoch"], r["avg_bits"], r["val_acc"]] for r in results["rounds"]]
        payload: dict[str, Any] = {
            "alq/bit_summary": wandb.Table(columns=list(summary.header),
                                           data=[list(row) for row in summary.table()]),
            "alq/rounds": wandb.Table(columns=["round", "epoch", "avg_bits", "val_acc"], data=rounds),
        }
        payload.update({f"plots/{name}": wandb.Image(str(path)) for name, path in plots.items()})
        run.log(payload)
        run.summary.update(final)
        if packed is not None and getattr(logger, "_app_options", {}).get("log_packed_model"):
            log_packed_model(run, packed, results)
