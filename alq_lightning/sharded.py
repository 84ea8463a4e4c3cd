"""ALQ on a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``, dim 0 of every weight split over a
1-D device mesh, as Lightning's ``ModelParallelStrategy`` applies it in ``configure_model``).

Each process holds the multi-bit state of its own rows of each weight only, as rank-local tensors on the layer
(not module buffers: FSDP2 neither shards nor gathers those): a layer of ``R`` rows is split as ``torch.chunk``
splits it (``ceil(R / world)`` rows per process, the last ones fewer), and every group lies within one row block
(the row-local layouts: ``subchannelwise``, ``kernelwise``, ``pixelwise``, ``channelwise``), so the local groups are
a contiguous run of the layer's groups, from ``group_offset`` on. Steps run on the local shard and its local
gradient. Decisions are global and equal the single-process ones: whether a step is skipped (a non-finite gradient
on any process), the bits counted, and the slots pruned (:func:`~alq_lightning.core.sharded.select_budget_sharded`
over global slot indices, a few reductions of bucket counts instead of gathering the scores).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from .core import GroupLayout, LayerBits, MultiBitState, QuadraticConfig, auto_layout
from .core.sharded import select_budget_sharded
from .layers import SHARDS, LayerSelection, QuantizedLayer, float_remainder, zeroed_tensors
from .network import MultiBitNetwork

T = TypeVar("T")
SHARDED_KEY = ".sharded"  # checkpoint["alq"] of a sharded checkpoint: {SHARDED_KEY: {layer: latent weights held}};
# no layer name starts with a dot


@dataclass
class ShardedLayer(QuantizedLayer):
    """A quantized parameter sharded on dim 0: ``layout`` covers the local rows, ``full_layout`` the whole weight,
    whose groups ``group_offset`` .. ``group_offset + layout.num_groups`` are local; the multi-bit tensors live in
    ``tensors`` (rank-local)."""

    full_layout: GroupLayout | None = None
    group_offset: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def stored(self, key: str) -> torch.Tensor:
        return self.tensors.get(key)

    def store(self, key: str, tensor: torch.Tensor) -> None:
        self.tensors[key] = tensor


def gather_groups(tensors: Mapping[str, torch.Tensor], group: dist.ProcessGroup) -> dict[str, torch.Tensor] | None:
    """``{key: [G_local, ...] tensor}`` of a layer on every process -> ``{key: [G, ...]}`` of the whole layer on the
    group's first process (on CPU), None on the others. Collective."""
    first = dist.get_rank(group) == 0
    parts = [None] * dist.get_world_size(group) if first else None
    dist.gather_object({key: tensor.detach().cpu() for key, tensor in tensors.items()}, parts,
                       dst=dist.get_global_rank(group, 0), group=group)
    if not first:
        return None
    return {key: torch.cat([part[key] for part in parts]) for key in tensors}  # ascending runs of groups


def export_gathered(model: nn.Module, layers: Mapping[str, ShardedLayer],
                    write: Callable[[dict[str, tuple[GroupLayout, MultiBitState, torch.dtype]],
                                     dict[str, torch.Tensor]], T]) -> T:
    """Gather every layer's whole state and the whole float remainder onto rank 0, which calls ``write(layers,
    remainder)`` (``{layer: (layout, state, weight dtype)}``, ``{state_dict key: tensor}``); every process returns
    its result. Collective: every process calls it."""
    group = next(iter(layers.values())).param.device_mesh.get_group()
    first = dist.get_rank(group) == 0
    records = {}
    for name, layer in layers.items():
        state = gather_groups({"codes": layer.state.codes, "coords": layer.state.coords,
                                      "mask": layer.state.mask}, group)
        if first:
            records[name] = (layer.full_layout, MultiBitState(**state), layer.param.dtype)
    remainder = {key: tensor.full_tensor().cpu() if isinstance(tensor, DTensor) else tensor.cpu()
                 for key, tensor in float_remainder(model, layers).items()}
    try:
        result = [write(records, remainder) if first else None]
    except (ValueError, RuntimeError, OSError) as error:  # every process raises it, none waits for rank 0
        result = [error]
    dist.broadcast_object_list(result, src=dist.get_global_rank(group, 0), group=group)
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


def row_chunk(rows: int, world: int, rank: int) -> tuple[int, int]:
    """``(first row, row count)`` of ``rank`` when ``torch.chunk`` splits ``rows`` over ``world`` (FSDP2's split)."""
    size = math.ceil(rows / world)
    first = min(rank * size, rows)
    return first, min(size, rows - first)


def attach_sharded(model: nn.Module, selection: LayerSelection) -> tuple[dict[str, ShardedLayer], dict[str, str]]:
    """Zeroed rank-local multi-bit state on the selected parameters of a ``fully_shard``-ed ``model``; returns the
    layers and the float candidates with the reason each stays float.

    Refuses a parameter that is not a ``DTensor`` sharded on dim 0 of a 1-D mesh of every process, a layout whose
    groups span rows (``columnwise``) and a layer that leaves a process without rows.
    """
    chosen, left_float = selection.select(model)
    layers = {}
    for name, (candidate, layout, max_bits) in chosen.items():
        param = candidate.param
        if not isinstance(param, DTensor) or param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
            placement = tuple(param.placements) if isinstance(param, DTensor) else "not a DTensor"
            raise ValueError(f"layer {name!r} is not sharded on dim 0 over one mesh dimension ({placement}): apply "
                             f"torch.distributed.fsdp.fully_shard to its module (data parallel only) in "
                             f"configure_model, or leave it in float (exclude=[{name!r}])")
        if layout.structure == "columnwise":
            raise ValueError(f"layer {name!r}: structure {layout.describe()} puts a column in a group, but FSDP2 "
                             f"shards rows, so its groups would straddle shards; use a row-local structure "
                             f"(structures={{{name!r}: 'subchannelwise'}}) or leave it in float (exclude=[{name!r}])")
        world, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
        if world != dist.get_world_size():
            raise ValueError(f"layer {name!r} is sharded over {world} of the {dist.get_world_size()} processes: ALQ "
                             f"shards over data parallelism alone; use ModelParallelStrategy(data_parallel_size="
                             f"{dist.get_world_size()}, tensor_parallel_size=1) and fully_shard over its mesh")
        rows = layout.shape[0]
        first, count = row_chunk(rows, world, rank)
        local = param.to_local()
        split = [row_chunk(rows, world, r)[1] for r in range(world)]
        if 0 in split:
            raise ValueError(f"layer {name!r} has {rows} rows, split over {world} processes as {split}: every "
                             f"process needs rows of its own; leave it in float (exclude=[{name!r}])")
        if local.shape[0] != count:
            raise ValueError(f"layer {name!r}: this process holds {local.shape[0]} of its {rows} rows, FSDP2's split "
                             f"gives it {count}; shard it with fully_shard's default placement (Shard(0))")
        local_layout = auto_layout(local.shape, layout.describe())
        layer = ShardedLayer(name, candidate.module, local_layout, candidate.attr, candidate.module_name,
                             full_layout=layout, group_offset=first * (layout.num_groups // rows))
        layer.tensors.update(zeroed_tensors(local_layout, max_bits, param.dtype, local.device))
        shards = candidate.module.__dict__.setdefault(SHARDS, {})
        shards[candidate.attr] = layer
        layers[name] = layer
    return layers, left_float


class ShardedNetwork(MultiBitNetwork):
    """:class:`~alq_lightning.network.MultiBitNetwork` over :class:`ShardedLayer` s: local steps, global decisions
    (see the module docstring). ``group``: the process group of the shards' mesh."""

    def __init__(self, layers: Mapping[str, ShardedLayer], float_layers: Mapping[str, str],
                 config: QuadraticConfig | None = None, compile: bool = False,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__(layers, float_layers, config, compile)
        self.group = group

    def _sum(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    @property
    def numel(self) -> int:
        return sum(layer.full_layout.numel for layer in self.layers.values())

    def layer_bits(self) -> dict[str, LayerBits]:
        """Bits of the whole layers: live slots summed over the processes (one reduction)."""
        layers = list(self.layers.values())
        live = self._sum(torch.stack([layer.buffer("mask").sum().long().cpu() for layer in layers])).tolist()
        return {layer.name: LayerBits(layer.full_layout.numel, layer.full_layout.num_groups,
                                      layer.full_layout.group_size, layer.state.max_bits, slots)
                for layer, slots in zip(layers, live)}

    def _updates(self, names: frozenset[str]) -> list[torch.Tensor]:
        """As :meth:`MultiBitNetwork._updates`, a step skipped on every process when a gradient anywhere is not
        finite."""
        buckets = self.bound()
        finite = torch.stack([bucket.grad.abs().amax() < torch.inf for bucket in buckets]).all().long()
        finite = self._sum(finite, dist.ReduceOp.MIN).bool()
        skipped = (~finite).long()
        self._skipped = skipped if self._skipped is None else self._skipped.add_(skipped)
        return [bucket.update_mask(names) & finite for bucket in buckets]

    def _select(self, scores: Mapping[str, torch.Tensor], bits: Mapping[str, torch.Tensor],
                bits_to_remove: float) -> dict[str, torch.Tensor]:
        """The global selection of :func:`~alq_lightning.core.prune.select_budget` over the layers' entries in
        (layer name, global flat index) order, for the local ``{layer: [G] or [G, K]}`` scores."""
        names = sorted(scores)
        start, indices = 0, []
        for name in names:
            layer, local = self.layers[name], scores[name]
            per_group = local.shape[1] if local.dim() == 2 else 1
            first = start + layer.group_offset * per_group
            indices.append(torch.arange(first, first + local.numel(), device=local.device))
            start += layer.full_layout.num_groups * per_group
        chosen = select_budget_sharded(torch.cat([scores[name].reshape(-1).double() for name in names]),
                                       torch.cat([bits[name].reshape(-1).double() for name in names]),
                                       torch.cat(indices), bits_to_remove, self._sum)
        sizes = [scores[name].numel() for name in names]
        return {name: part.view_as(scores[name]) for name, part in zip(names, chosen.split(sizes))}

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The whole model's :meth:`MultiBitNetwork.state_tensors` on the first process, ``{}`` on the others (it
        saves the checkpoint). Collective."""
        local = super().state_tensors()
        whole = {}
        for name, tensors in local.items():
            layer = self.layers[name]
            groups = {key: tensor for key, tensor in tensors.items() if key != "steps"}
            if groups["latent"].numel() == 0:
                groups.pop("latent")
            gathered = gather_groups(groups, self.group)
            if gathered is not None:
                gathered.setdefault("latent", tensors["latent"].new_zeros(0, layer.layout.group_size))
                whole[name] = {**gathered, "steps": tensors["steps"]}
        return whole

    def sharded_state_dict(self) -> dict[str, torch.Tensor]:
        """Each process's state as a sharded checkpoint holds it (``torch.distributed.checkpoint`` writes each
        shard from its process; nothing is gathered): ``{checkpoint_key(layer, key): DTensor}`` (:func:`rows_view`)
        and the replicated step counters (``key`` ``"steps"``). The latent weights are there only while held
        (STE)."""
        if len({checkpoint_key(name, "") for name in self.layers}) != len(self.layers):
            raise ValueError(f"layer names {sorted(self.layers)} collide as checkpoint keys (dots read as '/')")
        tensors = {}
        for name, layer in self.layers.items():
            for key, tensor in layer.multibit_tensors().items():
                if key != "latent" or tensor.numel():
                    tensors[checkpoint_key(name, key)] = rows_view(tensor.detach().contiguous(), layer)
            tensors[checkpoint_key(name, "steps")] = torch.tensor(self.steps()[name])
        return tensors

    def latents_held(self) -> dict[str, bool]:
        """``{layer: whether its latent weights are held}``, saved beside :meth:`sharded_state_dict`."""
        return {name: layer.buffer("latent").numel() > 0 for name, layer in self.layers.items()}

    def load_sharded(self, path: str, latents: Mapping[str, bool]) -> None:
        """Load each process's shard of :meth:`sharded_state_dict` from the sharded checkpoint folder ``path``,
        written by as many processes (``latents``: its :meth:`latents_held`). Collective."""
        from torch.distributed.checkpoint import load

        if set(latents) != set(self.layers):
            raise ValueError(f"checkpoint has multi-bit layers {sorted(latents)}, the model has {sorted(self.layers)}")
        state, local = {}, {}
        for name, layer in self.layers.items():
            local[name] = {}
            for key, tensor in layer.multibit_tensors().items():
                if key == "latent":
                    rows = layer.layout.num_groups if latents[name] else 0
                    tensor = tensor.new_empty(rows, layer.layout.group_size)
                local[name][key] = target = torch.zeros_like(tensor)
                if target.numel():
                    state[checkpoint_key(name, key)] = rows_view(target, layer)
            local[name]["steps"] = state[checkpoint_key(name, "steps")] = torch.zeros(2, dtype=torch.long)
        load({"state_dict": state}, checkpoint_id=path)  # beside the model's, in Lightning's "state_dict"
        super().load_state_tensors(local)

    def load_state_tensors(self, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Load each process's groups of the whole model's state (:meth:`state_tensors`, or a single process's)."""
        local = {}
        for name, saved in tensors.items():
            layer = self.layers.get(name)
            if layer is None:
                local[name] = saved
                continue
            rows = slice(layer.group_offset, layer.group_offset + layer.layout.num_groups)
            local[name] = {key: tensor if key == "steps" or (key == "latent" and tensor.numel() == 0) else tensor[rows]
                           for key, tensor in saved.items()}
        super().load_state_tensors(local)



def checkpoint_key(layer: str, key: str) -> str:
    """The key of ``layer``'s tensor ``key`` in a sharded checkpoint's ``state_dict``: ``alq/<layer>/<key>``, the
    layer's dots written as ``/`` (``torch.distributed.checkpoint`` reads dotted keys as module paths)."""
    return f"alq/{layer.replace('.', '/')}/{key}"


def rows_view(tensor: torch.Tensor, layer: ShardedLayer) -> DTensor:
    """The local groups ``tensor [G_local, ...]`` of ``layer`` as a view of the whole layer's ``[R, G / R, ...]``,
    a DTensor split on its ``R`` rows as FSDP2 splits the weight (every group lies within one row)."""
    rows = layer.full_layout.shape[0]
    local = tensor.view(-1, layer.full_layout.num_groups // rows, *tensor.shape[1:])
    shape = torch.Size((rows, *local.shape[1:]))
    return DTensor.from_local(local, layer.param.device_mesh, [Shard(0)], run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def hold_optimizer_state(optimizers: Sequence[torch.optim.Optimizer], layers: Mapping[str, ShardedLayer]) -> None:
    """Give each optimizer its (never used) state for the quantized weights it holds: one step with zero gradients of
    those weights alone at learning rate 0, which leaves every parameter as it is. The quantized weights take no
    optimizer step under ALQ, so they would have no state, while ``torch.distributed.checkpoint`` loads an optimizer
    into the state of every parameter: a sharded checkpoint's optimizer state must cover them."""
    quantized = {id(layer.param) for layer in layers.values()}
    for optimizer in optimizers:
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if id(p) in quantized and p not in optimizer.state]
        if not params:
            continue
        grads = {p: p.grad for group in optimizer.param_groups for p in group["params"]}
        for p in grads:
            p.grad = torch.zeros_like(p) if id(p) in quantized and p not in optimizer.state else None
        rates = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
        optimizer.step()
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        for p, grad in grads.items():
            p.grad = grad


def attach_network(model: nn.Module, selection: LayerSelection, config: QuadraticConfig | None = None,
                   compile: bool = False) -> ShardedNetwork:
    """:func:`attach_sharded` on ``model`` and the :class:`ShardedNetwork` over its layers (the process group of
    their mesh)."""
    layers, float_layers = attach_sharded(model, selection)
    group = next(iter(layers.values())).param.device_mesh.get_group()
    floats = ", ".join(f"{n} ({why})" for n, why in float_layers.items()) or "none"
    rank_zero_info(f"ALQ quantizes {len(layers)} sharded layers over {dist.get_world_size(group)} processes; left in "
             f"float: {floats}")
    return ShardedNetwork(layers, float_layers, config, compile, group)
