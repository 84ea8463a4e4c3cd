"""The packed file format and everything built on it, each module importing only those above it:

- :mod:`~alq_lightning.packed.format`     the layout of a file, bit packing of a layer, checks of a header;
- :mod:`~alq_lightning.packed.io`         ``export_packed`` / ``load_packed`` / ``ExportReport``, file checks;
- :mod:`~alq_lightning.packed.inference`  ``PackedModel`` / ``load_packed_for_inference``: packed weights
  unpacked one layer at a time;
- :mod:`~alq_lightning.packed.checkpoint` a Lightning checkpoint to its quantized model;
- :mod:`~alq_lightning.packed.cli`        the ``export`` and ``summary`` commands.

The public names are also ``alq_lightning``'s (``alq_lightning.export_packed``, ...).
"""
from .inference import PackedModel, load_packed_for_inference
from .io import ExportReport, export_packed, load_packed

__all__ = ["ExportReport", "PackedModel", "export_packed", "load_packed", "load_packed_for_inference"]
