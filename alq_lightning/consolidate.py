"""One checkpoint file from the folder of a sharded one: what a single process loads (``Trainer.fit(ckpt_path=)``,
``alq-export``) from what ``ModelParallelStrategy`` (FSDP2) writes.

Lightning writes a sharded checkpoint as a folder: the shards of the model and optimizer states
(``torch.distributed.checkpoint``) and ``meta.pt`` with the rest. ALQ's multi-bit state travels with the model's
shards, each process writing its own rows (:meth:`~alq_lightning.sharded.ShardedNetwork.sharded_state_dict`);
consolidation joins them into the ``"alq"`` entry a single process writes.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .files import check_target, write_atomic
from .layers import BUFFER_KEYS
from .sharded import SHARDED_KEY, checkpoint_key

META = "meta.pt"  # Lightning's file of everything but the model and optimizer shards


def read_sharded_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint in the sharded checkpoint ``folder`` as a single process saves it: whole tensors, the
    optimizer states listed as Lightning lists them, ALQ's state under ``"alq"`` (``{layer: {key: [G, ...]}}``).
    Needs the memory of the whole checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(folder)
    if not (folder.is_dir() and (folder / META).is_file() and (folder / ".metadata").is_file()):
        raise ValueError(f"{str(folder)!r} is not a sharded checkpoint: expected the folder ModelParallelStrategy "
                         f"writes, with {META} and the shards' .metadata")
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        joined = Path(scratch, "joined.pt")
        dcp_to_torch_save(folder, joined)
        checkpoint = torch.load(joined, map_location="cpu", weights_only=True)
    checkpoint.update(torch.load(folder / META, map_location="cpu", weights_only=True))
    count = sum(key.startswith("optimizer_") for key in checkpoint)
    checkpoint["optimizer_states"] = [checkpoint.pop(f"optimizer_{index}") for index in range(count)]
    latents = (checkpoint.get("alq") or {}).get(SHARDED_KEY)
    if latents is not None:
        checkpoint["alq"] = {layer: whole_layer(checkpoint["state_dict"], layer, held)
                             for layer, held in latents.items()}
    return checkpoint


def whole_layer(state_dict: dict[str, torch.Tensor], layer: str, latent_held: bool) -> dict[str, torch.Tensor]:
    """Pop ``layer``'s multi-bit tensors (``[R, G / R, ...]``) out of a joined ``state_dict``; ``{key: [G, ...]}``
    and ``"steps"``, with empty latent weights (``[0, n]``) where none were held."""
    tensors = {key: state_dict.pop(checkpoint_key(layer, key)).flatten(0, 1)
               for key in BUFFER_KEYS if key != "latent" or latent_held}
    tensors.setdefault("latent", tensors["coords"].new_zeros(0, tensors["codes"].shape[1]))
    tensors["steps"] = state_dict.pop(checkpoint_key(layer, "steps"))
    return tensors


def consolidate_checkpoint(folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the sharded checkpoint ``folder`` as the one file ``path`` (:func:`read_sharded_checkpoint`),
    atomically; returns ``path``."""
    target = check_target(path)
    checkpoint = read_sharded_checkpoint(folder)
    return write_atomic(target, lambda handle: torch.save(checkpoint, handle))


def consolidate_main(argv: list[str] | None = None, prog: str = "python -m alq_lightning consolidate") -> int:
    """``consolidate FOLDER FILE``: :func:`consolidate_checkpoint`. Returns the exit status."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description="Write a sharded (FSDP2) checkpoint folder as one "
                                     "checkpoint file that a single process resumes from or exports.")
    parser.add_argument("folder", help="the checkpoint folder ModelParallelStrategy wrote (with meta.pt)")
    parser.add_argument("file", help="the .ckpt file to write")
    args = parser.parse_args(argv)
    try:
        path = consolidate_checkpoint(args.folder, args.file)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0
