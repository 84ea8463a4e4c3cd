"""alq_lightning: Adaptive Loss-aware Quantization (ALQ) for PyTorch Lightning."""
from .callbacks import (
    ALQCallback,
    ALQInit,
    ALQStage,
    BasisRefit,
    BitwidthReduction,
    CoordinateRefit,
    GroupPruning,
    STEFineTune,
)
from .summary import BitSummary, bit_summary

__version__ = "0.1.0"
__all__ = [
    "ALQCallback", "ALQInit", "ALQStage", "BasisRefit", "BitwidthReduction", "CoordinateRefit", "GroupPruning",
    "STEFineTune", "BitSummary", "bit_summary", "__version__",
]
