"""alq_lightning: Adaptive Loss-aware Quantization (ALQ) for PyTorch Lightning.

Public names load on first use: ``import alq_lightning`` imports neither torch nor Lightning.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "callbacks": ("ALQCallback", "ALQInit", "ALQStage", "ActivationQuantization", "BasisRefit", "BitwidthReduction",
                  "CoordinateRefit", "GroupPruning", "STEFineTune"),
    "summary": ("BitSummary", "bit_summary"),
    "packed.io": ("ExportReport", "export_packed", "load_packed"),
    "packed.inference": ("PackedModel", "load_packed_for_inference"),
    "consolidate": ("consolidate_checkpoint",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [*_MODULE_OF, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'alq_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
