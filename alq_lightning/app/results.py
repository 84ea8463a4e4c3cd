"""``results.json`` of a run: accuracies, bits, storage, per-layer and per-round bits, timings, provenance (the
data files read, the config, seed, git commit and hardware)."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alq_lightning.files import write_atomic
from alq_lightning.summary import BitSummary

REQUIRED_KEYS = (
    "float_test_acc", "test_acc", "target_bits", "avg_bits", "storage_bytes", "compression", "layer_bits",
    "layers", "rounds", "timings_s", "pretrained", "data_files", "config", "seed", "git_commit", "hardware",
)


def git_commit(folder: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the folder holding ``folder`` (default: this package), or None."""
    folder = Path(folder or Path(__file__).resolve().parent)
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (None where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
    except OSError:
        return None


def hardware() -> dict[str, Any]:
    """Host, CPU, thread count, accelerator and library versions."""
    import lightning

    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": cpu_model() or platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": None,
    }
    if torch.cuda.is_available():
        info["cuda"] = {"devices": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0),
                        "version": torch.version.cuda}
    return info


def summarize_bits(summary32: BitSummary, summary16: BitSummary) -> dict[str, Any]:
    """Average bits, storage (bases only; with 32-bit and 16-bit coordinates; the whole model with its float
    remainder), per-layer bits and rows, and the weight matrices left in float."""
    return {
        "avg_bits": summary32.avg_bits,
        "num_weights": summary32.numel,
        "storage_bytes": {"binary": summary32.binary_bytes, "coords32": summary32.storage_bytes,
                          "coords16": summary16.storage_bytes, "float32": summary32.float_bytes,
                          "float_remainder": summary32.remainder_bytes, "model_coords32": summary32.model_bytes,
                          "model_coords16": summary16.model_bytes},
        "compression": {"coords32": summary32.compression, "coords16": summary16.compression,
                        "model_coords32": summary32.model_compression,
                        "model_coords16": summary16.model_compression},
        "float_tensors": {row.name: list(row.shape) for row in summary32.floats if len(row.shape) >= 2},
        "layer_bits": {row.name: row.avg_bits for row in summary32.rows},
        "layers": [dict(zip(summary32.header, row)) for row in summary32.table()],
        "activations": {"act_bits": {row.name: row.act_bits for row in summary32.act_rows},
                        "bops": summary32.bops, "macs": summary32.macs} if summary32.act_rows else None,
    }


def clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, tuples lists, tensors numbers."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if torch.is_tensor(value):
        return clean(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(data: dict[str, Any], path: str | Path, replace: bool = False) -> Path:
    """Write ``data`` as indented JSON to ``path`` (its folder created), atomically and, unless ``replace`` (this
    run's own file, updated), never over an existing file: FileExistsError then, the old file kept. Returns
    ``path``."""
    text = json.dumps(clean(data), indent=2, allow_nan=False) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")), exclusive=not replace)


class ExportError(RuntimeError):
    """The packed export of a finished run failed; its results.json is on disk and says why."""


def write_results_then_export(results: dict[str, Any], path: str | Path, export: Callable[[], Any]) -> Any:
    """Write ``results`` to ``path`` with ``"packed_file": None``, then call ``export()`` (an
    :class:`~alq_lightning.packed.io.ExportReport`), so that no export problem loses a finished run. ``results``
    and the file then get ``"packed_file"``: the packed file's name, bytes and average bits, or ``{"error": ...}``
    with the error, re-raised as :class:`ExportError` naming both files. Returns the report."""
    write_results({**results, "packed_file": None}, path)
    try:
        packed = export()
    except Exception as error:
        results["packed_file"] = {"error": f"{type(error).__name__}: {error}"}
        write_results(results, path, replace=True)
        raise ExportError(f"the run finished but its packed export failed ({type(error).__name__}: {error}); "
                          f"its results are in {path}, under packed_file.error") from error
    results["packed_file"] = {"name": Path(packed.path).name, "bytes": packed.file_bytes, "avg_bits": packed.avg_bits}
    write_results(results, path, replace=True)
    return packed
