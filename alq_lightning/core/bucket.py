"""Multi-bit state of several layers that share ``max_bits``, stepped together: a step in a fixed number of ops.

A bucket lays the groups of its layers end to end. Weight-level tensors are flat ``[N]`` (each layer's
``[G_l, n_l]`` group layout, row-major, one layer after another), group-level tensors are ``[G, K]`` with
``G = Σ G_l``, and ``group_sizes [G]`` says how many consecutive weights each group holds, so layers of
different group sizes share a bucket.

A step runs over *parts* of the bucket. With ``block=None`` (best on a GPU) the whole bucket is one ragged part
(:class:`Flat`): per-group work (pattern sums, codebook look-ups, the nearest-pattern search) runs on flat
indices ``g · 2^K + pattern``, so the ops a step launches depend on ``max_bits`` alone, not on the number of
layers, groups or group sizes. With a ``block`` of weights (best on a CPU, whose caches it fits), each part is
whole groups of one layer, viewed ``[g, n]`` (:class:`Rows`), the layout of :mod:`.steps`. No step reads a value
back to the host.

A step takes ``update [G]`` bool, the groups that take it (their layer got a gradient and every gradient is
finite); every other group, its statistics and its step counters stay bit-identical. Step counters are per
group and live on the device. Group by group the math is that of :mod:`.steps` (the same nearest-pattern
rule and tie-break, the same weighted refit), bit for bit on a CPU except where float rounding depends on the
batch: the per-group sums of second moments of a ragged part and, when a layer's groups are split into other
blocks, the solved coordinates.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from .multibit import all_patterns, codebook, solve_normal_equations
from .stats import AmsgradStats, QuadraticConfig
from .steps import count_below


@dataclass(frozen=True)
class Constants:
    """Tensors the steps of one ``(max_bits, dtype, device, config)`` read: built once, never written."""

    patterns: torch.Tensor  # [2^K, K] ±1: row b is pattern b
    patterns_t64: torch.Tensor  # [K, 2^K] float64, for the codebook
    outer: torch.Tensor  # [2^K, K·K]: row b is b bᵀ, flattened
    powers: torch.Tensor  # [K] int64: 2^k
    zero: torch.Tensor  # 0-dim, in the compute dtype, like the three below
    one: torch.Tensor
    beta2: torch.Tensor
    one_minus_beta1: torch.Tensor


_CONSTANTS: dict[tuple, Constants] = {}


def constants(max_bits: int, dtype: torch.dtype, device: torch.device, config: QuadraticConfig) -> Constants:
    """The :class:`Constants` of a configuration, built on first use (a plain dict, which ``torch.compile`` reads
    without tracing the construction)."""
    key = (max_bits, dtype, device, config)
    if key not in _CONSTANTS:
        patterns = all_patterns(max_bits, dtype, device)

        def scalar(value: float) -> torch.Tensor:
            return torch.full((), value, dtype=dtype, device=device)

        _CONSTANTS[key] = Constants(
            patterns=patterns,
            patterns_t64=patterns.T.double().contiguous(),
            outer=(patterns[:, :, None] * patterns[:, None, :]).reshape(-1, max_bits * max_bits),
            powers=1 << torch.arange(max_bits, device=device),
            zero=scalar(0.0), one=scalar(1.0), beta2=scalar(config.beta2), one_minus_beta1=scalar(1 - config.beta1),
        )
    return _CONSTANTS[key]


def pattern_sums(key: torch.Tensor, values: torch.Tensor, num_groups: int, max_bits: int) -> torch.Tensor:
    """``[G, 2^K]``: per group, the sum of ``values [N]`` over its weights of each pattern (``key = g·2^K + b``)."""
    sums = values.new_zeros(num_groups << max_bits)
    return sums.scatter_add_(0, key, values).view(num_groups, 1 << max_bits)


def nearest_patterns(codebook: torch.Tensor, target: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``[N]``: per weight, the pattern of its group's ``codebook [G, 2^K]`` nearest to ``target [N]``.

    Each group's values are sorted once; a weight's rank among its group's midpoints is found by a binary
    search of ``K`` halvings over flat indices (``base = g · 2^K``, int64). On a tie the smaller value wins.
    """
    size = codebook.shape[1]
    values, order = codebook.sort(dim=1)
    bounds = torch.cat([values[:, 1:], codebook.new_full((codebook.shape[0], 1), torch.inf)], dim=1)
    bounds = bounds.add_(values).mul_(0.5).view(-1)
    half = size // 2
    index = base + (half - 1)
    while half:
        index.add_(bounds.index_select(0, index) < target, alpha=half)
        if half > 1:
            index.sub_(half // 2)
        half //= 2
    return order.view(-1).index_select(0, index)


class Flat:
    """Index arithmetic over a ragged part: weight-level tensors stay ``[N]``; a weight of group ``g`` reads
    per-group tables at ``g`` and per-pattern tables at ``key = g · 2^K + b``."""

    def __init__(self, group_sizes: torch.Tensor, numel: int, max_bits: int) -> None:
        self.group_sizes, self.max_bits = group_sizes, max_bits
        self.group = torch.repeat_interleave(group_sizes, output_size=numel)
        self.base = self.group << max_bits

    def weights(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def expand(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group ``values [G]`` at every weight."""
        return values.index_select(0, self.group)

    def key(self, codes: torch.Tensor) -> torch.Tensor:
        return self.base + codes

    def lookup(self, table: torch.Tensor, key: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``table [G, 2^K]`` read at each weight's pattern."""
        return torch.index_select(table.view(-1), 0, key, out=out)

    def sums(self, key: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return pattern_sums(key, values, self.group_sizes.shape[0], self.max_bits)

    def group_sums(self, values: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(values, "sum", lengths=self.group_sizes)

    def nearest(self, codebook: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nearest_patterns(codebook, target, self.base)


class Rows:
    """Index arithmetic over a part whose groups all hold ``group_size`` weights: weight-level tensors are viewed
    ``[G, n]``, per-group values broadcast and per-pattern tables are read along rows, as in :mod:`.steps`."""

    def __init__(self, num_groups: int, group_size: int, max_bits: int) -> None:
        self.shape, self.max_bits = (num_groups, group_size), max_bits

    def weights(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(self.shape)

    def expand(self, values: torch.Tensor) -> torch.Tensor:
        return values[:, None]

    def key(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.long()

    def lookup(self, table: torch.Tensor, key: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.gather(table, 1, key, out=out)

    def sums(self, key: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(self.shape[0], 1 << self.max_bits).scatter_add_(1, key, values)

    def group_sums(self, values: torch.Tensor) -> torch.Tensor:
        return values.sum(dim=1)

    def nearest(self, codebook: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        values, order = codebook.sort(dim=1)
        return order.gather(1, count_below((values[:, 1:] + values[:, :-1]) / 2, target))


@dataclass
class Bucket:
    """References to the state of a bucket; steps update these tensors in place.

    ``codes [N]`` uint8 (bit ``k`` set iff ``β_k = +1``), ``coords``/``mask [G, K]``, ``weight_stats`` of
    ``[N]``, ``coord_stats`` of ``[G, K]``, ``weight_steps``/``coord_steps [G]`` int64 (updates folded into
    each group's statistics), ``group_sizes [G]`` int64, ``layers``, the ``(num_groups, group_size)`` of each
    layer in order (host integers), and ``latent [N]`` during STE (else None).
    """

    codes: torch.Tensor
    coords: torch.Tensor
    mask: torch.Tensor
    weight_stats: AmsgradStats
    coord_stats: AmsgradStats
    weight_steps: torch.Tensor
    coord_steps: torch.Tensor
    group_sizes: torch.Tensor
    layers: tuple[tuple[int, int], ...]
    latent: torch.Tensor | None = None

    @property
    def max_bits(self) -> int:
        return self.mask.shape[1]

    @property
    def num_groups(self) -> int:
        return self.mask.shape[0]

    @property
    def numel(self) -> int:
        return self.codes.shape[0]

    def constants(self, config: QuadraticConfig | None = None) -> Constants:
        return constants(self.max_bits, self.coords.dtype, self.coords.device, config or QuadraticConfig())

    def index(self) -> Flat | Rows:
        """:class:`Rows` when every group has one size, else :class:`Flat`."""
        if len({size for _, size in self.layers}) == 1:
            return Rows(self.num_groups, self.layers[0][1], self.max_bits)
        return Flat(self.group_sizes, self.numel, self.max_bits)

    def codebook(self, c: Constants | None = None) -> torch.Tensor:
        """``[G, 2^K]``: the value ``Σ_k mask α_k b_k`` of every pattern ``b``."""
        return codebook(self.coords * self.mask, (c or self.constants()).patterns_t64)

    def reconstruct(self, out: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
        """``[N]`` ŵ (into ``out`` when given)."""
        out = self.coords.new_empty(self.numel) if out is None else out
        for part, _, weights in self.parts(block):
            index = part.index()
            index.lookup(part.codebook(), index.key(index.weights(part.codes)), out=index.weights(out[weights]))
        return out

    def parts(self, block: int | None) -> Iterator[tuple[Bucket, slice, slice]]:
        """``(part, groups, weights)``: the whole bucket (``block=None``), or whole groups of one layer of about
        ``block`` weights each, ``part`` a bucket of views."""
        if block is None:
            yield self, slice(0, self.num_groups), slice(0, self.numel)
            return
        for groups, weights, size in _spans(self.layers, block):
            yield self.part(groups, weights, size), groups, weights

    def part(self, groups: slice, weights: slice, group_size: int) -> Bucket:
        """The state of ``groups`` (holding ``weights``, each group ``group_size`` of them) as views."""
        view = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, AmsgradStats):
                rows = weights if item.name == "weight_stats" else groups
                value = AmsgradStats(value.m[rows], value.v[rows], value.vmax[rows])
            elif isinstance(value, torch.Tensor):
                value = value[weights if item.name in ("codes", "latent") else groups]
            view[item.name] = value
        view["layers"] = ((groups.stop - groups.start, group_size),)
        return Bucket(**view)


@functools.lru_cache(maxsize=64)
def _spans(layers: tuple[tuple[int, int], ...], block: int) -> list[tuple[slice, slice, int]]:
    spans, group, weight = [], 0, 0
    for num_groups, group_size in layers:
        per_block = max(1, block // group_size)
        for first in range(0, num_groups, per_block):
            count = min(per_block, num_groups - first)
            spans.append((slice(group, group + count), slice(weight, weight + count * group_size), group_size))
            group, weight = group + count, weight + count * group_size
    return spans


def _fold(stats: AmsgradStats, grad: torch.Tensor, update: torch.Tensor, config: QuadraticConfig,
          c: Constants) -> None:
    """AMSGrad statistics update where ``update`` (broadcastable to the statistics), else unchanged.

    ``grad`` must be 0 where ``update`` is False.
    """
    stats.m.lerp_(grad, torch.where(update, c.one_minus_beta1, c.zero))
    stats.v.mul_(torch.where(update, c.beta2, c.one)).addcmul_(grad, grad, value=1 - config.beta2)
    torch.maximum(stats.vmax, stats.v, out=stats.vmax)


def _corrections(steps: torch.Tensor, update: torch.Tensor, lr: float | torch.Tensor, config: QuadraticConfig,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group ``lr / (1 - β1^t)`` (0 where not ``update``) and ``sqrt(1 - β2^t)``, computed in float64.

    ``lr`` may be a 0-dim float64 tensor (a compiled step then serves every learning rate)."""
    t = steps.clamp(min=1).double()
    scale = update.double().mul_(lr).div_(1 - torch.pow(config.beta1, t))
    root = (1 - torch.pow(config.beta2, t)).sqrt_()
    return scale.to(dtype), root.to(dtype)


def _move(stats: AmsgradStats, scale: torch.Tensor, root: torch.Tensor,
          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The AMSGrad move ``p / h`` (0 where ``scale`` is) and ``h``, with ``p = m · scale`` and
    ``h = (sqrt(v̄) + eps) / root``."""
    h = stats.vmax.sqrt().add_(eps).div_(root)
    return (stats.m * scale).div_(h), h


def _flip_negative(coords: torch.Tensor, codes: torch.Tensor, index: Flat | Rows, c: Constants,
                   first_moment: torch.Tensor | None = None) -> None:
    """Make ``coords [G, K]`` >= 0 by negating ``(α, β)`` pairs of ``codes`` (and that slot's first moment)."""
    negative = coords < 0
    coords.abs_()
    codes.bitwise_xor_(index.expand((negative * c.powers).sum(dim=1)).to(codes.dtype))
    if first_moment is not None:
        first_moment.mul_(1 - 2 * negative.to(first_moment.dtype))


def weight_domain_step(bucket: Bucket, grad: torch.Tensor, update: torch.Tensor, lr: float | torch.Tensor,
                       config: QuadraticConfig, ste: bool = False, block: int | None = None,
                       out: torch.Tensor | None = None) -> None:
    """Basis step (``ste=False``) or straight-through step of the groups in ``update [G]``.

    ``grad [N]`` is the gradient w.r.t. ŵ (any value where not ``update``). Folds it into the weight
    statistics, moves to ``target = ŵ - p/h`` (STE: ``latent ← latent - p/h``), takes the nearest patterns
    for the current coordinates, refits the coordinates weighted by ``h``, makes them non-negative and
    re-derives the coordinate statistics (:func:`~alq_lightning.core.steps.basis_step`); writes the new ŵ
    ``[N]`` into ``out`` when given.
    """
    for part, groups, weights in bucket.parts(block):
        _weight_domain_part(part, grad[weights], update[groups], lr, config, ste,
                            None if out is None else out[weights])


def _weight_domain_part(bucket: Bucket, grad: torch.Tensor, update: torch.Tensor, lr: float | torch.Tensor,
                        config: QuadraticConfig, ste: bool, out: torch.Tensor | None) -> None:
    c, bits, groups, index = bucket.constants(config), bucket.max_bits, bucket.num_groups, bucket.index()
    weights = index.weights
    stats = AmsgradStats(*(weights(t) for t in vars(bucket.weight_stats).values()))
    grad, current = weights(grad), weights(bucket.codes)
    moving = index.expand(update)
    _fold(stats, torch.where(moving, grad, c.zero), moving, config, c)
    bucket.weight_steps.add_(update)
    scale, root = _corrections(bucket.weight_steps, update, lr, config, bucket.coords.dtype)
    move, h = _move(stats, index.expand(scale), index.expand(root), config.eps)
    book = bucket.codebook(c)
    target = weights(bucket.latent).sub_(move) if ste else index.lookup(book, index.key(current)).sub_(move)
    dead = (~bucket.mask * c.powers).sum(dim=1)
    codes = index.nearest(book, target).bitwise_or_(index.expand(dead))
    key = index.key(codes)
    coords = solve_normal_equations((index.sums(key, h) @ c.outer).view(groups, bits, bits),
                                    index.sums(key, h * target) @ c.patterns, bucket.mask)
    _flip_negative(coords, codes, index, c)
    rows = update[:, None]
    codes = torch.where(moving, codes, current)
    current.copy_(codes)
    bucket.coords.copy_(torch.where(rows, coords, bucket.coords))
    key = index.key(codes)
    mine = bucket.coord_stats
    mine.m.copy_(torch.where(rows, (index.sums(key, stats.m) @ c.patterns) * bucket.mask, mine.m))
    for target_stat, source in ((mine.v, stats.v), (mine.vmax, stats.vmax)):
        target_stat.copy_(torch.where(rows, index.group_sums(source)[:, None], target_stat))
    bucket.coord_steps.copy_(torch.where(update, bucket.weight_steps, bucket.coord_steps))
    if out is not None:
        index.lookup(bucket.codebook(c), key, out=weights(out))


def _observe(bucket: Bucket, grad: torch.Tensor, update: torch.Tensor, config: QuadraticConfig,
             index: Flat | Rows, c: Constants) -> None:
    rows = update[:, None]
    key = index.key(index.weights(bucket.codes))
    projected = (index.sums(key, index.weights(grad)) @ c.patterns) * bucket.mask
    _fold(bucket.coord_stats, torch.where(rows, projected, c.zero), rows, config, c)
    bucket.coord_steps.add_(update)


def observe(bucket: Bucket, grad: torch.Tensor, update: torch.Tensor, config: QuadraticConfig,
            block: int | None = None) -> None:
    """Fold the coordinate gradients ``βᵀ g`` of the groups in ``update`` into the coordinate statistics."""
    for part, groups, weights in bucket.parts(block):
        _observe(part, grad[weights], update[groups], config, part.index(), part.constants(config))


def coordinate_step(bucket: Bucket, grad: torch.Tensor, update: torch.Tensor, lr: float | torch.Tensor,
                    config: QuadraticConfig, block: int | None = None, out: torch.Tensor | None = None) -> None:
    """AMSGrad step on the live coordinates of the groups in ``update`` (bases fixed), then flip negative
    ``(α, β, m_α)`` (:func:`~alq_lightning.core.steps.coordinate_step`); writes the new ŵ ``[N]`` into ``out``
    when given."""
    for part, groups, weights in bucket.parts(block):
        c, index, update_part = part.constants(config), part.index(), update[groups]
        _observe(part, grad[weights], update_part, config, index, c)
        scale, root = _corrections(part.coord_steps, update_part, lr, config, part.coords.dtype)
        move, _ = _move(part.coord_stats, scale[:, None], root[:, None], config.eps)
        part.coords.sub_(torch.where(part.mask, move, c.zero))
        codes = index.weights(part.codes)
        _flip_negative(part.coords, codes, index, c, part.coord_stats.m)
        if out is not None:
            index.lookup(part.codebook(c), index.key(codes), out=index.weights(out[weights]))
