"""The packed-file commands: ``export`` (a Lightning checkpoint to a packed file) and ``summary`` (a packed file's
per-layer table). Run them as ``alq-export`` / ``alq-summary`` or ``python -m alq_lightning export|summary``
(:mod:`alq_lightning.cli` dispatches to :func:`export_main` and :func:`summary_main`).

Tables go to a terminal as Rich tables and anywhere else (a pipe, a file, a log) as the plain text of
``str(BitSummary)``, which stays the same whatever the terminal's width.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..models import MODEL_NAMES
from ..summary import BitSummary, bit_summary
from .checkpoint import model_from_checkpoint, module_from_checkpoint, read_checkpoint
from .io import export_packed, packed_summary, read_packed


def show(summary: BitSummary) -> None:
    """Print ``summary``: a Rich table when stdout is a terminal and Rich is installed, else its plain text."""
    try:
        from rich.console import Console
    except ImportError:
        print(summary)
        return
    console = Console()
    if console.is_terminal:
        console.print(summary)
    else:
        print(summary)


def export_main(argv: Sequence[str] | None = None, prog: str = "python -m alq_lightning export") -> int:
    """Export a checkpoint; print the bit summary and the file's size. Returns the exit status. ``prog`` names
    the command in the usage text (``alq-export``, ``python -m alq_lightning export``)."""
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Write a Lightning checkpoint's ALQ model as a bit-packed file.")
    parser.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) written with ALQ attached, or the folder of a "
                                           "sharded (FSDP2) one")
    parser.add_argument("output", help="packed file to write (.alq)")
    parser.add_argument("--coord-bits", type=int, choices=(16, 32), default=32, help="coordinate precision")
    parser.add_argument("--model", choices=MODEL_NAMES, help="architecture, when the hyper-parameters lack it")
    parser.add_argument("--in-channels", type=int)
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--prefix", default="model.", help="state_dict prefix of the model inside the module")
    parser.add_argument("--module", metavar="CLASS_PATH",
                        help="any LightningModule class (package.module.Class): the checkpoint is loaded with its "
                             "load_from_checkpoint and the whole module exported (--model and the sizes unused)")
    args = parser.parse_args(argv)
    try:
        checkpoint = read_checkpoint(args.checkpoint)
        if args.module:
            model = module_from_checkpoint(args.checkpoint, checkpoint, args.module)
        else:
            model = model_from_checkpoint(checkpoint, args.prefix, model=args.model, in_channels=args.in_channels,
                                          num_classes=args.num_classes, input_size=args.input_size)
        report = export_packed(model, args.output, args.coord_bits)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    show(bit_summary(model, args.coord_bits))
    print(report)
    return 0


def summary_main(argv: Sequence[str] | None = None, prog: str = "python -m alq_lightning summary") -> int:
    """Print the per-layer table and totals of a packed file. Returns the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description="Print the per-layer table and totals of a packed file, "
                                     "from its header once the file is verified (checksum, header against payload).")
    parser.add_argument("path", help="packed file written by alq_lightning.export_packed")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        header = read_packed(args.path).header
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    show(packed_summary(header))
    return 0
