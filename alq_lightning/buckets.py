"""Quantized layers bound to flat buckets: each layer's multi-bit buffers become views of its bucket's tensors.

Layers that share ``max_bits``, the state's dtype and the device share a :class:`~alq_lightning.core.bucket.Bucket`,
so a step runs the bucket math once for all of them. The modules keep their buffers (``alq_codes``, ...), now
views of the bucket's storage, so checkpoints, pruning, export and ``bit_summary`` see every update. Moving the
model (``.to()``) or re-registering a buffer breaks the views; :meth:`BoundBucket.is_bound` notices it by identity
and the owner binds afresh, copying the current buffers.

Gradients are gathered into one flat buffer and ŵ is written back into the weights with one ``_foreach_copy_``
each, through views of the buffers in each weight's own shape and layout.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from .core import AmsgradStats
from .core.bucket import Bucket
from .layers import _FLOATBUFFER_KEYS, BUFFER_KEYS, QuantizedLayer

_WEIGHT_KEYS = ("codes", "weight_m", "weight_v", "weight_vmax", "latent")
BLOCK = {"cpu": 1 << 18}  # weights per block by device type; absent: one block


def bucket_key(layer: QuantizedLayer) -> tuple:
    """Layers with equal keys share a bucket: ``(max_bits, state dtype, device)``."""
    coords = layer.buffer("coords")
    return layer.state.max_bits, coords.dtype, coords.device


class BoundBucket:
    """A bucket over ``layers`` (same :func:`bucket_key`), built from their current buffers.

    ``steps``: per layer ``(weight steps, coordinate steps)``, the counters the bucket starts from.
    """

    def __init__(self, layers: Sequence[QuantizedLayer], steps: Mapping[str, tuple[int, int]]) -> None:
        self.layers = list(layers)
        first = self.layers[0]
        bits, dtype, device = bucket_key(first)
        storage = first.stored("coords").dtype
        sizes = [(layer.layout.num_groups, layer.layout.group_size) for layer in self.layers]
        groups, weights = sum(g for g, _ in sizes), sum(g * n for g, n in sizes)
        self.spans, g0, w0 = [], 0, 0
        for g, n in sizes:
            self.spans.append((slice(g0, g0 + g), slice(w0, w0 + g * n)))
            g0, w0 = g0 + g, w0 + g * n
        latent = all(layer.buffer("latent").numel() for layer in self.layers)
        shapes = {key: (weights,) if key in _WEIGHT_KEYS else (groups, bits) for key in BUFFER_KEYS}
        if not latent:
            shapes["latent"] = (0,)
        kinds = {key: {"codes": torch.uint8, "mask": torch.bool}.get(key, storage) for key in BUFFER_KEYS}
        self.storage = {key: torch.empty(shapes[key], dtype=kinds[key], device=device) for key in BUFFER_KEYS}
        self.registered: list[dict[str, torch.Tensor]] = []
        for layer, (g, n), (rows, flat) in zip(self.layers, sizes, self.spans):
            views = {}
            for key in BUFFER_KEYS:
                if key == "latent" and not latent:
                    view = torch.zeros(0, n, dtype=storage, device=device)
                else:
                    whole = self.storage[key]
                    view = whole[flat].view(g, n) if key in _WEIGHT_KEYS else whole[rows]
                    view.copy_(layer.stored(key))
                layer.store(key, view)
                views[key] = view
            self.registered.append(views)
        state = {key: t.view(dtype) if key in _FLOATBUFFER_KEYS else t for key, t in self.storage.items()}
        per_group = torch.tensor([g for g, _ in sizes])
        counters = torch.tensor([steps[layer.name] for layer in self.layers], dtype=torch.long).T
        self.bucket = Bucket(
            codes=state["codes"], coords=state["coords"], mask=state["mask"],
            weight_stats=AmsgradStats(state["weight_m"], state["weight_v"], state["weight_vmax"]),
            coord_stats=AmsgradStats(state["coord_m"], state["coord_v"], state["coord_vmax"]),
            weight_steps=counters[0].repeat_interleave(per_group).to(device),
            coord_steps=counters[1].repeat_interleave(per_group).to(device),
            group_sizes=torch.tensor([n for _, n in sizes]).repeat_interleave(per_group).to(device),
            layers=tuple(sizes), latent=state["latent"] if latent else None,
        )
        self.grad = torch.zeros(weights, dtype=dtype, device=device)
        self.weight = torch.zeros(weights, dtype=dtype, device=device)
        flats = [flat for _, flat in self.spans]
        self.grad_views = [layer.layout.weight_view(self.grad[f]) for layer, f in zip(self.layers, flats)]
        self.weight_views = [layer.layout.weight_view(self.weight[f]) for layer, f in zip(self.layers, flats)]
        self.block = BLOCK.get(device.type)
        self.lr = torch.zeros((), dtype=torch.float64, device=device)
        self.static = False
        self._masks: dict[frozenset[str], torch.Tensor] = {}

    def mark_static(self) -> None:
        """Tell ``torch.compile`` that the state, gradient and learning-rate tensors keep their addresses (a CUDA
        graph then updates them in place instead of copying them); once per binding."""
        if self.static:
            return
        self.static = True
        bucket = self.bucket
        tensors = [bucket.codes, bucket.coords, bucket.mask, bucket.weight_steps, bucket.coord_steps,
                   bucket.group_sizes, self.grad, self.lr, *vars(bucket.weight_stats).values(),
                   *vars(bucket.coord_stats).values(), *([] if bucket.latent is None else [bucket.latent])]
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)

    def is_bound(self) -> bool:
        """Whether every layer's buffers are still this bucket's views."""
        return all(layer.stored(key) is view
                   for layer, views in zip(self.layers, self.registered) for key, view in views.items())

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def gather(self) -> frozenset[str]:
        """Copy the weights' gradients into :attr:`grad` (zeros for layers without one), clear them from the
        weights and return the names of the layers that had one."""
        grads = [layer.local_grad() for layer in self.layers]
        have = [i for i, grad in enumerate(grads) if grad is not None]
        if have:
            torch._foreach_copy_([self.grad_views[i] for i in have], [grads[i] for i in have])
        if len(have) < len(self.layers):
            missing = sorted(set(range(len(self.layers))) - set(have))
            torch._foreach_zero_([self.grad_views[i] for i in missing])
        for layer in self.layers:
            layer.param.grad = None
        return frozenset(self.layers[i].name for i in have)

    def grad_groups(self) -> dict[str, torch.Tensor]:
        """``{layer: [G, n] view of its gathered gradient}``."""
        return {layer.name: self.grad[flat].view(layer.layout.num_groups, -1)
                for layer, (_, flat) in zip(self.layers, self.spans)}

    def load(self, grads: Mapping[str, torch.Tensor]) -> frozenset[str]:
        """Copy ``{layer: [G, n] gradient}`` into :attr:`grad` (zeros for the other layers)."""
        for name, view in self.grad_groups().items():
            if name in grads:
                view.copy_(grads[name])
            else:
                view.zero_()
        return frozenset(name for name in self.names() if name in grads)

    def update_mask(self, names: frozenset[str]) -> torch.Tensor:
        """``[G]`` bool: the groups of the layers in ``names`` (built once per set of names)."""
        key = names & frozenset(self.names())
        if key not in self._masks:
            mask = torch.zeros(self.bucket.num_groups, dtype=torch.bool)
            for layer, (rows, _) in zip(self.layers, self.spans):
                mask[rows] = layer.name in key
            self._masks[key] = mask.to(self.grad.device)
        return self._masks[key]

    def write_weights(self, names: frozenset[str]) -> None:
        """Copy ŵ, which a step left in :attr:`weight`, into the weights of the layers ``names`` (the others
        keep theirs)."""
        chosen = [i for i, layer in enumerate(self.layers) if layer.name in names]
        if chosen:
            with torch.no_grad():
                torch._foreach_copy_([self.layers[i].local_param() for i in chosen],
                                     [self.weight_views[i] for i in chosen])

    def steps(self) -> dict[str, tuple[int, int]]:
        """Per layer ``(weight steps, coordinate steps)`` (reads the device)."""
        firsts = torch.tensor([rows.start for rows, _ in self.spans], device=self.grad.device)
        counters = torch.stack([self.bucket.weight_steps[firsts], self.bucket.coord_steps[firsts]], dim=1).tolist()
        return {layer.name: tuple(pair) for layer, pair in zip(self.layers, counters)}

    def set_steps(self, steps: Mapping[str, tuple[int, int]]) -> None:
        for layer, (rows, _) in zip(self.layers, self.spans):
            if layer.name in steps:
                weight_steps, coord_steps = steps[layer.name]
                self.bucket.weight_steps[rows] = weight_steps
                self.bucket.coord_steps[rows] = coord_steps


def bind(layers: Iterable[QuantizedLayer], steps: Mapping[str, tuple[int, int]]) -> list[BoundBucket]:
    """Buckets over ``layers`` grouped by :func:`bucket_key`, in order of first appearance."""
    grouped: dict[tuple, list[QuantizedLayer]] = {}
    for layer in layers:
        grouped.setdefault(bucket_key(layer), []).append(layer)
    return [BoundBucket(members, steps) for members in grouped.values()]
