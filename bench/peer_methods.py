"""The peers of ``bench/peers.py``: torchao's PARQ and Brevitas, set up on named weight matrices of any model and
trained from Lightning.

PARQ (``torchao.prototype.parq``) quantizes through its optimizer: ``QuantOptimizer`` wraps AdamW, and after each
base step projects the quantized parameter group onto the levels of its quantizer (keeping the float latent
weights in the optimizer state). It must be driven by manual optimization — backward first, then ``opt.step()``
on ``self.optimizers(use_pl_optimizer=False)``: under automatic optimization ``step(closure)`` restores the
latent float weights before it runs the closure, so forward and backward would see float weights.
Settings, as torchao's PARQ README and ``QuantOptimizer`` give them: ``quant_per_channel=True`` (one set of
levels per row, or per block with ``quant_block_size``), ``quant_period=10``, ``LSBQuantizer()`` (greedy, as
its default), ``UnifQuantizer()``, ``ProxHardQuant()``, ``ProxPARQ(anneal_start, anneal_end, steepness=10)``
annealed from the first step to 90 % of the steps, hard quantization after.

Brevitas quantizes in the forward: each weight matrix gets a parametrization that returns Brevitas's weight
quantizer applied to it (a ``QuantLinear``/``QuantConv2d`` holds the quantizer and shares the Parameter), binary
(``QuantType.BINARY``, ``sign(w)·s``) or ternary (2-bit narrow-range integers, ``{-1, 0, 1}·s``) with one
learned float scale per output channel (``ScalingImplType.PARAMETER_FROM_STATS``, initialised from the mean
absolute weight of the channel) and straight-through gradients.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from peer_bytes import max_levels

ANNEAL_END = 0.9  # ProxPARQ: fraction of the steps annealed; hard quantization after
STEEPNESS = 10.0  # ProxPARQ's default


@dataclass(frozen=True)
class Peer:
    """One peer method: ``library`` torchao or brevitas, ``quantizer`` lsbq/unif (PARQ) or binary/ternary
    (Brevitas), ``bits`` of code per weight, at most ``levels`` values per group (a row, or ``block`` weights),
    ``scales`` float scales per group, ``prox`` hard/parq (PARQ only)."""

    name: str
    library: str
    quantizer: str
    bits: int
    levels: int
    scales: int
    block: int | None = None
    prox: str | None = None

    def settings(self) -> dict:
        return asdict(self)


def peers() -> list[Peer]:
    """Every peer of the benchmark, in order."""
    methods = [Peer(f"PARQ LSBQ {bits}-bit {'row' if block is None else f'block {block}'} {prox}", "torchao",
                    "lsbq", bits, 2 ** bits, bits, block, prox)
               for bits in (1, 2) for block in (None, 64) for prox in ("hard", "parq")]
    methods.append(Peer("PARQ Unif 2-bit row hard", "torchao", "unif", 2, 4, 1, None, "hard"))
    methods.append(Peer("Brevitas binary row", "brevitas", "binary", 1, 2, 1))
    methods.append(Peer("Brevitas ternary row", "brevitas", "ternary", 2, 3, 1))
    return methods


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding parameter ``name`` of ``model`` and its attribute name."""
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


class BrevitasWeight(nn.Module):
    """Parametrization: the weight as Brevitas's weight quantizer of ``holder`` returns it (same shape)."""

    def __init__(self, holder: nn.Module) -> None:
        super().__init__()
        self.holder = holder

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.holder.weight_quant(weight).value


def brevitas_quant(kind: str):
    """Brevitas weight quantizer: ``binary`` or ``ternary``, a learned float scale per output channel."""
    from brevitas.core.bit_width import BitWidthImplType
    from brevitas.core.quant import QuantType
    from brevitas.core.restrict_val import FloatToIntImplType, RestrictValueType
    from brevitas.core.scaling import ScalingImplType
    from brevitas.core.stats import StatsOp
    from brevitas.core.zero_point import ZeroZeroPoint
    from brevitas.inject import ExtendedInjector
    from brevitas.quant.solver import WeightQuantSolver

    class PerChannel(ExtendedInjector):
        bit_width_impl_type = BitWidthImplType.CONST
        scaling_impl_type = ScalingImplType.PARAMETER_FROM_STATS
        scaling_stats_op = StatsOp.AVE
        restrict_scaling_type = RestrictValueType.FP
        zero_point_impl = ZeroZeroPoint
        float_to_int_impl_type = FloatToIntImplType.ROUND
        scaling_per_output_channel = True
        narrow_range = True
        signed = True

    class PerChannelWeight(PerChannel, WeightQuantSolver):
        quant_type = QuantType.BINARY if kind == "binary" else QuantType.INT
        bit_width = 1 if kind == "binary" else 2

    return PerChannelWeight


def attach_brevitas(model: nn.Module, names: list[str], kind: str) -> None:
    """Quantize the weights ``names`` of ``model`` (2-D, or 4-D convolution kernels) with Brevitas in place."""
    import brevitas.nn as qnn

    quant = brevitas_quant(kind)
    for name in names:
        module, attr = owner(model, name)
        weight = getattr(module, attr)
        if weight.dim() == 2:
            holder = qnn.QuantLinear(weight.shape[1], weight.shape[0], bias=False, weight_quant=quant)
        elif weight.dim() == 4:
            holder = qnn.QuantConv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False,
                                     weight_quant=quant)
        else:
            raise ValueError(f"Brevitas weights: {name} has shape {list(weight.shape)}; 2-D or 4-D expected")
        del holder.weight
        holder.weight = weight  # the quantizer initialises its scales from this Parameter at its first call
        parametrize.register_parametrization(module, attr, BrevitasWeight(holder))


def forward_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight ``name`` as the forward uses it (through a parametrization if there is one)."""
    module, attr = owner(model, name)
    with torch.no_grad():
        return getattr(module, attr).detach().clone()


def check_quantized(model: nn.Module, names: list[str], peer: Peer) -> int:
    """Most distinct values in any group of the forward weights; raises if more than ``peer.levels``."""
    most = max(max_levels(forward_weight(model, name), peer.block) for name in names)
    if most > peer.levels:
        raise RuntimeError(f"{peer.name}: a group of the forward weights takes {most} distinct values, more than "
                           f"{peer.levels}: the run did not train quantized")
    return most


def cosine(total_steps: int):
    """LR factor: cosine decay from 1 to 0.1 over ``total_steps``."""
    def factor(step: int) -> float:
        progress = min(1.0, step / max(1, total_steps))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
    return factor


class PeerLM(L.LightningModule):
    """Next-token cross-entropy of ``model`` (``[B, T]`` ids -> ``[B, T, vocab]`` logits) trained by manual
    optimization: AdamW (no weight decay, as the ALQ runs) at ``lr`` with cosine decay, wrapped in PARQ's
    ``QuantOptimizer`` for a torchao peer; Brevitas peers quantize in the forward (:func:`attach_brevitas`)."""

    def __init__(self, model: nn.Module, peer: Peer, names: list[str], lr: float, total_steps: int) -> None:
        super().__init__()
        self.model, self.peer, self.names, self.lr, self.total_steps = model, peer, names, lr, total_steps
        self.automatic_optimization = False
        self.scheduler = None
        if peer.library == "brevitas":
            attach_brevitas(model, names, peer.quantizer)

    def quantized_parameters(self) -> list[nn.Parameter]:
        params = []
        for name in self.names:
            module, attr = owner(self.model, name)
            params.append(module.parametrizations[attr].original if parametrize.is_parametrized(module, attr)
                          else getattr(module, attr))
        return params

    def configure_optimizers(self):
        quantized = self.quantized_parameters()
        ids = {id(p) for p in quantized}
        others = [p for p in self.model.parameters() if id(p) not in ids]
        group = {"params": quantized, "weight_decay": 0.0}
        if self.peer.library == "torchao":
            group["quant_bits"] = self.peer.bits
            if self.peer.block is not None:
                group["quant_block_size"] = self.peer.block
        base = torch.optim.AdamW([group, {"params": others, "weight_decay": 0.0}], lr=self.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(base, cosine(self.total_steps))
        if self.peer.library != "torchao":
            return base
        from torchao.prototype.parq import LSBQuantizer, ProxHardQuant, ProxPARQ, QuantOptimizer, UnifQuantizer

        quantizer = LSBQuantizer() if self.peer.quantizer == "lsbq" else UnifQuantizer()
        prox = (ProxHardQuant() if self.peer.prox == "hard"
                else ProxPARQ(0, int(ANNEAL_END * self.total_steps), steepness=STEEPNESS))
        return QuantOptimizer(base, quantizer, prox, quant_per_channel=True)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers(use_pl_optimizer=False)
        x, y = batch
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        self.scheduler.step()
        return loss


class StepTimer(L.Callback):
    """Wall time of each training batch (forward, backward, optimizer and quantizer steps), in seconds."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.start = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self.start)


class ForwardCheck(L.Callback):
    """Before the last training batch, :func:`check_quantized` on the weights the forward is about to use."""

    def __init__(self, names: list[str], peer: Peer, last_step: int) -> None:
        self.names, self.peer, self.last_step, self.levels, self.seen = names, peer, last_step, None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.seen == self.last_step:  # counted here: a raw optimizer's steps leave trainer.global_step at 0
            self.levels = check_quantized(module.model, self.names, self.peer)
        self.seen += 1
