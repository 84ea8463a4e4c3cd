"""What a multirun leaves in its folder (``python train.py -m alq.target_bits=2,1,0.7``): one table over its jobs
(``sweep.csv``) and the accuracy against average bits and against bytes (``sweep_accuracy.png``), written by the
Hydra callback :class:`SweepCurve` (``hydra.callbacks.sweep_curve`` in conf/config.yaml) when the multirun ends."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from alq_lightning.files import write_atomic

log = logging.getLogger("alq_lightning.app")
COLUMNS = ("job", "target_bits", "avg_bits", "file_bytes", "storage_bytes", "float_test_acc", "test_acc", "val_acc",
           "optimized_metric", "optimized_value")


def sweep_rows(folder: Path) -> list[dict[str, Any]]:
    """One row per job folder of ``folder`` holding a ``results.json`` (failed jobs have none), by average bits."""
    rows = []
    for path in folder.glob("*/results.json"):
        results = json.loads(path.read_text())
        rows.append({"job": path.parent.name, "target_bits": results["target_bits"], "avg_bits": results["avg_bits"],
                     "file_bytes": (results.get("packed_file") or {}).get("bytes"),
                     "storage_bytes": results["storage_bytes"]["coords32"],
                     "float_test_acc": results["float_test_acc"], "test_acc": results["test_acc"],
                     "val_acc": results.get("val_acc"), "optimized_metric": results["optimized_metric"]["name"],
                     "optimized_value": results["optimized_metric"]["value"]})
    return sorted(rows, key=lambda row: (row["avg_bits"], row["job"]))


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> Path:
    """Test accuracy (and the float model's) against average bits and against storage bytes, one point per job."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, key, label in zip(fig.subplots(1, 2), ("avg_bits", "storage_bytes"),
                              ("average bits per weight", "quantized storage (bytes, 32-bit coords)"), strict=True):
        ax.plot([row[key] for row in rows], [100 * row["test_acc"] for row in rows], "o-", label="ALQ, test")
        ax.axhline(100 * rows[0]["float_test_acc"], color="gray", linestyle="--", label="float, test")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.legend()
    fig.suptitle(f"accuracy over {len(rows)} jobs")
    fig.savefig(path, dpi=120)
    return path


def write_sweep(folder: Path) -> dict[str, Path]:
    """``sweep.csv`` and (with matplotlib) ``sweep_accuracy.png`` in ``folder`` from its jobs' results."""
    rows = sweep_rows(folder)
    if not rows:
        log.warning(f"no job of the multirun in {folder} left a results.json: no sweep table or plot")
        return {}
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    table = folder / "sweep.csv"
    write_atomic(table, lambda handle: handle.write(text.getvalue().encode()))
    written = {"table": table}
    if importlib.util.find_spec("matplotlib") is not None:
        written["plot"] = plot_sweep(rows, folder / "sweep_accuracy.png")
    lines = [f"  {row['avg_bits']:.4f} bits, {row['storage_bytes']} B: test acc {row['test_acc']:.4f} (job "
             f"{row['job']})" for row in rows]
    log.info(f"sweep of {len(rows)} jobs in {folder}:\n" + "\n".join(lines))
    return written


class SweepCurve(Callback):
    """Hydra callback: when a multirun ends, :func:`write_sweep` over its jobs in ``hydra.sweep.dir``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_sweep(Path(str(config.hydra.sweep.dir)))
