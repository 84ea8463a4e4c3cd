"""Lightning callbacks running the ALQ stages on any LightningModule."""
from .activations import ActivationQuantization
from .alq_callback import ALQCallback
from .init import ALQInit
from .stages import ALQStage, BasisRefit, BitwidthReduction, CoordinateRefit, GroupPruning, STEFineTune

__all__ = ["ALQCallback", "ALQInit", "ALQStage", "ActivationQuantization", "BasisRefit", "BitwidthReduction",
           "CoordinateRefit", "GroupPruning", "STEFineTune"]
