"""Lightning callbacks running the ALQ stages on any LightningModule."""
from .init import ALQInit
from .pipeline import ALQCallback
from .stages import ALQStage, BasisRefit, BitwidthReduction, CoordinateRefit, GroupPruning, STEFineTune

__all__ = ["ALQCallback", "ALQInit", "ALQStage", "BasisRefit", "BitwidthReduction", "CoordinateRefit",
           "GroupPruning", "STEFineTune"]
