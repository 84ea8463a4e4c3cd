"""The character-level transformer of ``char_lm.py`` quantized under FSDP2: ``python bench/char_lm.py --fsdp2``.

The ALQ fit runs on 2 spawned CPU processes (gloo) under Lightning's ``ModelParallelStrategy``: each encoder layer
and then the whole transformer are ``fully_shard``-ed in ``configure_model``, so every weight matrix (character and
position embeddings, attention's raw ``in_proj_weight`` and ``out_proj``, the feed-forward layers, the head) is
split on its rows and ALQ holds each process's rows only. Every process takes its half of each batch of the
single-process run (rows ``rank``, ``rank + 2``, ...), so the two processes together see exactly its batches. The
fit ends with ``export_packed`` (rank 0 writes the one file); the parent loads that file into a fresh copy of the
float model, which is what is evaluated and counted.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule, fully_shard

from char_lm import CharLM, CharTransformer, RandomWindows, alq_epochs, check_all_quantized
from common import exit_without_finalizing, free_port

WORLD = 2
KEYS = ("max_bits", "rounds", "basis_epochs", "coordinate_epochs", "pruning_epochs", "ste_epochs",
        "final_coordinate_epochs", "lr")


class ShardedCharLM(CharLM):
    """:class:`CharLM` whose transformer shards itself: each encoder layer, then the rest."""

    def configure_model(self) -> None:
        if isinstance(self.model, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.encoder.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


class HalfBatches(torch.utils.data.IterableDataset):
    """Rows ``rank::world`` of each batch of ``windows``."""

    def __init__(self, windows: RandomWindows, rank: int, world: int) -> None:
        self.windows, self.rank, self.world = windows, rank, world

    def __len__(self) -> int:
        return len(self.windows)

    def __iter__(self):
        for x, y in self.windows:
            yield x[self.rank::self.world], y[self.rank::self.world]


def rank_job(rank: int, port: int, model: CharTransformer, train_ids: torch.Tensor, target: float, config: dict,
             seed: int, path: str) -> None:
    """One process of the sharded fit; rank 0 writes the packed file ``path``."""
    from alq_lightning import ALQCallback, export_packed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), NODE_RANK="0",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=r".*IterableDataset. has .__len__. defined")
    warnings.filterwarnings("ignore", message=r".*returned a view tensor.*")
    alq = ALQCallback(target_bits=target, **{key: config[key] for key in KEYS})
    module = ShardedCharLM(copy.deepcopy(model), config["float_lr"])
    windows = RandomWindows(train_ids, model.context, config["batch_size"], config["batches"], seed)
    trainer = L.Trainer(max_epochs=alq.total_epochs, accelerator="cpu", devices=WORLD, logger=False,
                        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[alq], num_sanity_val_steps=0)
    trainer.fit(module, torch.utils.data.DataLoader(HalfBatches(windows, rank, WORLD), batch_size=None))
    export_packed(module.model, path)
    exit_without_finalizing()


def quantize_sharded(model: CharTransformer, train_ids: torch.Tensor, target: float, config: dict, seed: int) -> dict:
    """:func:`char_lm.quantize`'s record for the fit under FSDP2 on 2 processes; ``module``: the float model's copy
    with the packed file loaded."""
    from alq_lightning import bit_summary, load_packed
    from alq_lightning.layers import resolve

    if config["batch_size"] % WORLD:
        raise ValueError(f"batch_size={config['batch_size']} does not split over {WORLD} processes")
    with tempfile.TemporaryDirectory() as directory:
        path = str(Path(directory, "char_lm.alq"))
        start = time.perf_counter()
        mp.spawn(rank_job, args=(free_port(), model, train_ids, target, config, seed, path), nprocs=WORLD)
        seconds = time.perf_counter() - start
        module = CharLM(load_packed(path, copy.deepcopy(model)), config["float_lr"])
        packed_bytes = Path(path).stat().st_size
    summary = bit_summary(module)
    params = {row.name: getattr(*resolve(module, row.name)) for row in summary.rows}
    network = SimpleNamespace(layers={name: SimpleNamespace(param=p) for name, p in params.items()}, float_layers={})
    counts = check_all_quantized(module, network)
    return {"module": module, "avg_bits": summary.avg_bits, "storage_bytes": summary.storage_bytes,
            "binary_bytes": summary.binary_bytes, "float_remainder_bytes": summary.remainder_bytes,
            "model_bytes": summary.model_bytes, "packed_file_bytes": packed_bytes, "seconds": seconds,
            "total_epochs": alq_epochs(config),
            "strategy": f"FSDP2 (ModelParallelStrategy) on {WORLD} CPU processes",
            "layers": [{"name": r.name, "shape": list(r.shape), "structure": r.structure, "avg_bits": r.avg_bits}
                       for r in summary.rows], **counts}
