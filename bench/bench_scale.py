"""ALQ on a GPT-style causal language model on 2 CPU processes: FSDP2 against DDP, memory per process.

    python bench/bench_scale.py                     # ≥ 100 M parameters (GPT-2 small's geometry), 24 steps each
    python bench/bench_scale.py --small --out /tmp/s.json --markdown /tmp/s.md   # a few M parameters, a minute

Model: token and position embeddings (``nn.Embedding``), pre-norm blocks of causal self-attention (a Linear
``qkv`` of ``[3d, d]``, ``F.scaled_dot_product_attention`` with ``is_causal``, a Linear ``proj``) and an MLP of
``4d``, a final LayerNorm and a Linear head. Data: a seeded uniform token stream cut into windows of ``context + 1``
tokens; process ``r`` takes windows ``r, r + 2, ...`` (the same under both strategies). Every parameter of two
or more dimensions is quantized by ``ALQCallback(target_bits, max_bits)`` with its schedule fitted into the
fit's optimizer steps (rounds of basis, coordinate and pruning steps, STE steps, final coordinate steps).

The same fit runs twice on 2 processes (gloo), each with one thread: under ``ModelParallelStrategy(
data_parallel_size=2, tensor_parallel_size=1)``, the model built on the meta device and sharded in
``configure_model`` (``fully_shard`` on every block, the embeddings and the head, then the whole), each process
materialising its own shard only; and under DDP (``strategy="ddp"``) on the model built whole. Per process:

- ALQ state: bytes of ALQ's tensors (codes, coordinates, masks, statistics, latent weights, the buckets' step
  buffers), counted from the tensors after every backward and every step, the largest count kept;
- model: bytes of the parameters this process holds, their gradients and the optimizer state (AdamW over the
  float parameters; ``--optimizer all``: over every one), counted the same way (storages counted once); the
  acceptance figure compares ALQ state + model;
- peak RSS (``resource.getrusage``: the process's whole memory, the framework included) and the RSS before
  the model is built;
- step time: the median wall time of a training step (the first one left out), final average bits.

Writes ``bench/results/scale.json`` and the ``scale`` section of ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from alq_lightning import ALQCallback
from alq_lightning.sharded import row_chunk

from common import exit_without_finalizing, free_port, git_state, hardware, write_section

HERE = Path(__file__).resolve().parent
WORLD = 2
FULL = {"vocab": 16384, "dim": 768, "layers": 12, "heads": 12, "context": 64, "batch_size": 4, "steps": 24,
        "max_bits": 4, "target_bits": 2.0, "lr": 3e-4, "optimizer": "float"}
SMALL = dict(FULL, vocab=256, dim=256, layers=4, heads=4, steps=12)
ACCEPTANCE = 0.6  # sharded ALQ state + model per process, as a fraction of DDP's at most


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP: ``[B, T, d] -> [B, T, d]``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, dim // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class GPT(nn.Module):
    """Tokens ``[B, T]`` -> logits ``[B, T, vocab]``."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def initialise(model: nn.Module, seed: int) -> None:
    """Matrices N(0, 0.02), biases 0, norms 1; a parameter sharded on dim 0 takes its rows of the whole draw, so
    that the sharded model starts as the whole one does."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            if param.dim() < 2:
                local.fill_(1.0 if "norm" in name else 0.0)
                continue
            whole = torch.randn(param.shape, generator=generator) * 0.02
            if isinstance(param, DTensor):
                first, count = row_chunk(param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank())
                whole = whole[first:first + count]
            local.copy_(whole)


class LanguageModel(L.LightningModule):
    """Next-token cross-entropy; ``sharded``: built on the meta device, sharded and materialised in
    ``configure_model``."""

    def __init__(self, config: dict, sharded: bool, seed: int = 0) -> None:
        super().__init__()
        self.config, self.sharded, self.seed = config, sharded, seed
        shape = {key: config[key] for key in ("vocab", "dim", "layers", "heads", "context")}
        with torch.device("meta" if sharded else "cpu"):
            self.net = GPT(**shape)
        if not sharded:
            initialise(self.net, seed)

    def configure_model(self) -> None:
        if not self.sharded or isinstance(self.net, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for module in (self.net.embed, self.net.position, *self.net.blocks, self.net.head):
            fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)
        self.net.to_empty(device="cpu")
        initialise(self.net, self.seed)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens = batch[0]
        logits = self.net(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the parameters ALQ leaves in float (those of one dimension: ALQ steps every matrix itself),
        or over every parameter (``config["optimizer"] == "all"``)."""
        every = self.config["optimizer"] == "all"
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad and (every or p.dim() < 2)],
                                 lr=self.config["lr"])


def storages(tensors) -> dict[int, int]:
    """``{storage address: bytes}`` of ``tensors`` (the local part of a DTensor; each storage once)."""
    found = {}
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storage = local.untyped_storage()
        if storage.nbytes():
            found[storage.data_ptr()] = storage.nbytes()
    return found


class Meter(Callback):
    """Counts ALQ's and the model's tensor bytes after every backward and step (the largest kept) and times the
    training steps."""

    def __init__(self, alq) -> None:
        self.alq = alq
        self.alq_bytes = self.model_bytes = self.total_bytes = 0
        self.step_times: list[float] = []
        self.started = 0.0

    def count(self, trainer, pl_module) -> None:
        network = self.alq.network
        alq = storages(tensor for layer in network.layers.values() for tensor in layer.multibit_tensors().values())
        alq |= storages(tensor for bucket in network.buckets for tensor in (
            bucket.grad, bucket.weight, bucket.lr, bucket.bucket.weight_steps, bucket.bucket.coord_steps,
            bucket.bucket.group_sizes))
        params = list(pl_module.parameters())
        model = storages([*params, *(p.grad for p in params if p.grad is not None),
                          *(value for optimizer in trainer.optimizers for state in optimizer.state.values()
                            for value in state.values() if isinstance(value, torch.Tensor))])
        model = {address: size for address, size in model.items() if address not in alq}
        alq_bytes, model_bytes = sum(alq.values()), sum(model.values())
        self.alq_bytes, self.model_bytes = max(self.alq_bytes, alq_bytes), max(self.model_bytes, model_bytes)
        self.total_bytes = max(self.total_bytes, alq_bytes + model_bytes)

    def on_after_backward(self, trainer, pl_module) -> None:
        self.count(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_times.append(time.perf_counter() - self.started)
        self.count(trainer, pl_module)


def rank_job(rank: int, port: int, strategy: str, config: dict, directory: str) -> None:
    """One process of a fit: writes ``<directory>/<strategy><rank>.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), NODE_RANK="0",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*sync_dist=True.*")  # ALQ logs its global figures from rank 0 alone
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sharded = strategy == "fsdp2"
    model = LanguageModel(config, sharded)
    alq = ALQCallback(config["target_bits"], max_bits=config["max_bits"])
    meter = Meter(alq)
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, max_epochs=1, max_steps=config["steps"], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1) if sharded else "ddp",
        callbacks=[alq, meter])
    windows = config["steps"] * config["batch_size"] * WORLD
    stream = torch.randint(config["vocab"], (windows, config["context"] + 1),
                           generator=torch.Generator().manual_seed(1))
    data = TensorDataset(stream)
    loader = DataLoader(data, batch_size=config["batch_size"],
                        sampler=DistributedSampler(data, WORLD, rank, shuffle=False))
    start = time.perf_counter()
    trainer.fit(model, loader)
    network = alq.network
    result = {
        "quantized_weights": network.numel, "layers": len(network.layers),
        "parameters": sum(p.numel() for p in model.parameters()),
        "alq_state_bytes": meter.alq_bytes, "model_bytes": meter.model_bytes,
        "alq_and_model_bytes": meter.total_bytes,
        "rss_before_model_bytes": rss_before,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "steps": len(meter.step_times), "step_seconds": statistics.median(meter.step_times[1:] or meter.step_times),
        "fit_seconds": time.perf_counter() - start, "avg_bits": network.avg_bits,
    }
    Path(directory, f"{strategy}{rank}.json").write_text(json.dumps(result))
    exit_without_finalizing()


def run(strategy: str, config: dict) -> list[dict]:
    """Fit on 2 spawned processes; each process's figures."""
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(rank_job, args=(free_port(), strategy, config, directory), nprocs=WORLD)
        return [json.loads(Path(directory, f"{strategy}{rank}.json").read_text()) for rank in range(WORLD)]


def summarise(runs: dict[str, list[dict]]) -> dict:
    """The largest per-process figures of each strategy and the sharded/DDP ratios."""
    worst = {strategy: {key: max(rank[key] for rank in ranks) for key in ranks[0]} for strategy, ranks in runs.items()}
    ratios = {key: worst["fsdp2"][key] / worst["ddp"][key]
              for key in ("alq_state_bytes", "model_bytes", "alq_and_model_bytes", "peak_rss_bytes", "step_seconds")}
    if any(rank["avg_bits"] != ranks[0]["avg_bits"] for ranks in runs.values() for rank in ranks):
        raise RuntimeError(f"the processes of one fit end at different average bits: {runs}")
    return {"per_rank_max": worst, "fsdp2_over_ddp": ratios,
            "accepted": ratios["alq_and_model_bytes"] <= ACCEPTANCE}


def markdown(results: dict) -> str:
    config, worst, ratios = results["config"], results["per_rank_max"], results["fsdp2_over_ddp"]
    mib = 2 ** 20
    lines = [
        "## Scale out: FSDP2 against DDP on a GPT-style model",
        "",
        f"`{results['command']}` on {results['date']} at {results['git_commit']} ({results['hardware']}, 2 processes "
        f"of one thread, gloo): a causal LM of {worst['ddp']['parameters']:,} parameters ({config['layers']} "
        f"blocks, d = {config['dim']}, vocabulary {config['vocab']}, context {config['context']}), "
        f"{worst['ddp']['quantized_weights']:,} of them quantized in {worst['ddp']['layers']} layers, "
        f"`max_bits={config['max_bits']}`, `target_bits={config['target_bits']}`, a schedule fitted into "
        f"{config['steps']} optimizer steps of {config['batch_size']} windows per process, AdamW over "
        f"{'every parameter' if config['optimizer'] == 'all' else 'the float parameters'}. Per process (the larger "
        f"of the two): ALQ state and model (parameters, gradients, AdamW state) counted from the tensors, at their "
        f"largest; peak RSS of the whole process.",
        "",
        "| strategy | ALQ state (MiB) | model (MiB) | ALQ + model (MiB) | RSS before model (MiB) | peak RSS (MiB) "
        "| step (s) | avg bits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for strategy in ("ddp", "fsdp2"):
        row = worst[strategy]
        lines.append(f"| {strategy} | {row['alq_state_bytes'] / mib:.1f} | {row['model_bytes'] / mib:.1f} | "
                     f"{row['alq_and_model_bytes'] / mib:.1f} | {row['rss_before_model_bytes'] / mib:.0f} | "
                     f"{row['peak_rss_bytes'] / mib:.0f} | {row['step_seconds']:.2f} | {row['avg_bits']:.3f} |")
    verdict = "meets" if results["accepted"] else "misses"
    lines += ["", f"FSDP2 / DDP per process: ALQ state {ratios['alq_state_bytes']:.2f}, model "
                  f"{ratios['model_bytes']:.2f}, ALQ + model {ratios['alq_and_model_bytes']:.2f} ({verdict} the "
                  f"≤ {ACCEPTANCE} target), peak RSS {ratios['peak_rss_bytes']:.2f}, step time "
                  f"{ratios['step_seconds']:.2f}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--small", action="store_true", help="a few M parameters and 12 steps (a quick check)")
    parser.add_argument("--steps", type=int, help="optimizer steps of each fit (default 24, --small 12)")
    parser.add_argument("--optimizer", choices=("float", "all"), default="float",
                        help="AdamW over the float parameters only (default), or over every parameter: under FSDP2 "
                             "the quantized ones then get (never used) AdamW state, which sharded checkpoints need")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    config = dict(SMALL if args.small else FULL, optimizer=args.optimizer)
    if args.steps is not None:
        if args.steps < 2:
            parser.error(f"--steps {args.steps}: an ALQ schedule needs at least 2 steps")
        config["steps"] = args.steps
    runs = {strategy: run(strategy, config) for strategy in ("fsdp2", "ddp")}
    results = {"hardware": hardware(), "torch": torch.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **git_state(),
               "command": " ".join(["python", "bench/bench_scale.py", *sys.argv[1:]]), "config": config,
               "runs": runs, **summarise(runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    section = markdown(results)
    write_section(args.markdown, "scale", section)
    print(section)


if __name__ == "__main__":
    main()
