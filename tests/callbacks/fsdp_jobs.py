"""Jobs the FSDP2 tests run in two spawned CPU processes (gloo), and the modules they shard.

A job sets the variables Lightning's environment reads (so the strategy launches nothing), builds the module with
the seed, fits it under ``ModelParallelStrategy`` and saves what each rank holds to ``<directory>/rank<r>.pt``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

from alq_lightning import ALQCallback, export_packed
from alq_lightning.network import MultiBitNetwork

from tiny import TinyModule, TinyTransformer, loader, mlp


def plain_cnn() -> nn.Module:
    """Conv (channelwise), grouped Conv (kernelwise), Conv of 16 inputs (pixelwise), Linear; no batch statistics,
    which a rank would take over its half of the batch."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 2), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 4),
    )


NETS = {"mlp": mlp, "cnn": plain_cnn, "transformer": TinyTransformer}
DATA = {"mlp": "image", "cnn": "image", "transformer": "tokens"}


class ShardedModule(TinyModule):
    """:class:`TinyModule` that shards every child of ``net`` holding parameters, then ``net``, in
    ``configure_model`` (once)."""

    def configure_model(self) -> None:
        if isinstance(self.net, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for child in self.net.children():
            if any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def build(kind: str, sharded: bool, seed: int = 0) -> TinyModule:
    torch.manual_seed(seed)
    return (ShardedModule if sharded else TinyModule)(NETS[kind]())


class SaveState(Callback):
    """At the end of the fit, exports the model to ``<path without rank digits>.alq`` (under DDP the first process
    alone) and saves ``{layer: state tensors}`` (this process's, and the whole model's as checkpoints take it), each
    layer's group offset, whole weights, whole ``state_dict`` and input quantizers' ``{layer: tensors}``."""

    def __init__(self, alq: ALQCallback, path: Path) -> None:
        self.alq, self.path = alq, path

    def on_train_end(self, trainer, pl_module) -> None:
        network = self.alq.network
        weights = {name: layer.param.full_tensor() if hasattr(layer.param, "full_tensor") else layer.param.detach()
                   for name, layer in network.layers.items()}
        offsets = {name: getattr(layer, "group_offset", 0) for name, layer in network.layers.items()}
        model = {key: value.full_tensor() if isinstance(value, DTensor) else value
                 for key, value in pl_module.state_dict().items()}
        exports = isinstance(trainer.strategy, ModelParallelStrategy) or trainer.global_rank == 0
        target = self.path.parent / f"{self.path.stem.rstrip('0123456789')}.alq"
        file_bytes = export_packed(pl_module, target).file_bytes if exports else None
        inputs = {} if self.alq.activations is None else {name: {key: tensor.clone() for key, tensor in
                                                                 layer.tensors().items()}
                                                          for name, layer in self.alq.activations.layers.items()}
        torch.save({"state": MultiBitNetwork.state_tensors(network), "gathered": network.state_tensors(),
                    "offsets": offsets, "weights": weights, "model": model, "inputs": inputs,
                    "avg_bits": network.avg_bits, "file_bytes": file_bytes}, self.path)


def fit(kind: str, alq_options: dict, path: Path, sharded: bool, world: int = 1, callbacks=(), ckpt_path=None,
        **trainer_options) -> None:
    """Fit ``kind`` under ALQ with the full batch of 32 split over ``world`` ranks (from ``ckpt_path`` if given; DDP
    when not ``sharded`` on several ranks); save the state to ``path``."""
    alq = ALQCallback(**alq_options)
    options = dict(accelerator="cpu", devices=world, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    if sharded:
        options["strategy"] = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    elif world > 1:
        options["strategy"] = "ddp"
    options.update(trainer_options)
    trainer = L.Trainer(callbacks=[alq, SaveState(alq, path), *callbacks], max_epochs=alq.total_epochs, **options)
    data = loader(DATA[kind], batch_size=32 // world)
    if world > 1:  # rank r takes samples r, r + world, ...: the ranks' batches make the single batch
        sampler = DistributedSampler(data.dataset, world, int(os.environ["LOCAL_RANK"]), shuffle=False)
        data = DataLoader(data.dataset, batch_size=data.batch_size, sampler=sampler)
    trainer.fit(build(kind, sharded), data, ckpt_path=ckpt_path)


def leave() -> None:
    """End a spawned process without Python's finalization. A gloo worker thread may release its last collective's
    tensors only after the interpreter began finalizing, and a thread that needs the GIL then aborts the process
    ("terminate called without an active exception", SIGABRT); FSDP2's process groups outlive
    ``destroy_process_group``, so their threads can't be joined first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def sharded_job(rank: int, world: int, port: int, kind: str, alq_options: dict, directory: Path,
                sharded: bool = True) -> None:
    """The body of one spawned process: saves ``rank<r>.pt`` (FSDP2), or ``ddp<r>.pt`` (DDP, not ``sharded``)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    fit(kind, alq_options, directory / f"{'rank' if sharded else 'ddp'}{rank}.pt", sharded=sharded, world=world)
    leave()


def resume_job(rank: int, world: int, port: int, kind: str, alq_options: dict, directory: Path,
               epoch: int = 3) -> None:
    """A sharded fit that checkpoints every epoch (``directory/ckpt``), then the same fit resumed from ``epoch``'s."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    every_epoch = ModelCheckpoint(directory / "ckpt", "{epoch}", save_top_k=-1, every_n_epochs=1)
    fit(kind, alq_options, directory / f"full{rank}.pt", sharded=True, world=world, callbacks=[every_epoch],
        enable_checkpointing=True)
    fit(kind, alq_options, directory / f"resumed{rank}.pt", sharded=True, world=world,
        ckpt_path=directory / "ckpt" / f"epoch={epoch}.ckpt")
    leave()


def refusal_job(rank: int, world: int, port: int, directory: Path) -> None:
    """Attach ALQ to models FSDP2 cannot serve row by row; saves each error message to ``directory``."""
    import torch.distributed as dist

    from alq_lightning.layers import LayerSelection
    from alq_lightning.sharded import attach_sharded

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cases = {
        "columnwise": (nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)), {"structures": {"1": "columnwise"}}, True),
        "too_few_rows": (nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 1)), {}, True),
        "not_sharded": (nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)), {}, False),
    }
    messages = {}
    for case, (net, options, shard) in cases.items():
        if shard:
            for child in net:
                fully_shard(child)
        try:
            attach_sharded(net, LayerSelection(max_bits=2, **options))
            messages[case] = None
        except ValueError as error:
            messages[case] = str(error)
    torch.save(messages, directory / f"refusals{rank}.pt")
    dist.destroy_process_group()
    leave()
