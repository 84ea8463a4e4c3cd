"""Multi-bit state of one layer and its greedy initialisation (structured sketching).

Shapes, with ``G = num_groups``, ``K = max_bits`` and ``n = group_size``:

- ``codes``  ``[G, n]`` uint8: the binary bases, packed per weight. Bit ``k`` of ``codes[g, j]`` is set iff
  ``β_{g,k,j} = +1``; :attr:`MultiBitState.bases` unpacks them to ``[G, K, n]`` ±1;
- ``coords`` ``[G, K]`` float >= 0: the coordinates ``α_{g,k}``;
- ``mask``   ``[G, K]`` bool: live slots. A group with no live slot is all zeros (pruned).

The reconstruction is ``ŵ_g = Σ_k mask_{g,k} α_{g,k} β_{g,k}``: each weight reads its value from the
group's codebook of ``2^K`` pattern values. Shapes never change; pruning clears mask bits. Dead slots keep
``β = +1`` and ``α = 0``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_BITS_LIMIT = 8


def check_max_bits(max_bits: int) -> int:
    """Validate ``max_bits`` (an integer in ``[1, 8]``) and return it."""
    if isinstance(max_bits, bool) or not isinstance(max_bits, int) or not 1 <= max_bits <= MAX_BITS_LIMIT:
        raise ValueError(f"max_bits={max_bits!r} must be an integer in [1, {MAX_BITS_LIMIT}]")
    return max_bits


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def all_patterns(max_bits: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """``[2^K, K]`` ±1: row ``i`` has ``+1`` in column ``k`` iff bit ``k`` of ``i`` is set."""
    index = torch.arange(2**max_bits, device=device)
    bits = (index[:, None] >> torch.arange(max_bits, device=device)) & 1
    return (2 * bits - 1).to(dtype)


def slot_bits(flags: torch.Tensor) -> torch.Tensor:
    """``[G, K]`` bool -> ``[G]`` int64 with bit ``k`` set where ``flags[:, k]``."""
    return (flags.long() << torch.arange(flags.shape[1], device=flags.device)).sum(dim=1)


def pattern_sums(codes: torch.Tensor, values: torch.Tensor, max_bits: int) -> torch.Tensor:
    """``[G, 2^K]``: per group, the sum of ``values [G, n]`` over the weights whose code is each pattern.

    ``codes [G, n]`` are pattern indices (uint8 or int64).
    """
    sums = torch.zeros(codes.shape[0], 2**max_bits, dtype=values.dtype, device=values.device)
    return sums.scatter_add_(1, codes.long(), values)


def codebook(live_coords: torch.Tensor, patterns_t: torch.Tensor | None = None) -> torch.Tensor:
    """``[G, 2^K]``: per group the value ``Σ_k α_k b_k`` of every pattern ``b`` for ``live_coords [G, K]`` (dead
    slots 0), in their dtype.

    The at most 8 signed terms are summed in float64, where float32 sums are exact, so a value does not depend
    on how many groups are computed at once (every reconstruction of ŵ agrees bit for bit). ``patterns_t`` is
    ``all_patterns(K, float64).T`` when the caller has it.
    """
    if patterns_t is None:
        patterns_t = all_patterns(live_coords.shape[1], torch.float64, live_coords.device).T
    return torch.mm(live_coords.double(), patterns_t).to(live_coords.dtype)


BLOCK = 1 << 20


def row_blocks(num_groups: int, group_size: int, block: int = BLOCK) -> list[slice]:
    """Slices of consecutive groups holding about ``block`` weights each (at least one group)."""
    rows = max(1, block // max(group_size, 1))
    return [slice(start, start + rows) for start in range(0, num_groups, rows)] or [slice(0, 0)]


@dataclass
class MultiBitState:
    """References to one layer's ``codes [G, n]``, ``coords [G, K]`` and ``mask [G, K]``.

    Steps update these tensors in place, so a state built over a module's buffers keeps them current.
    """

    codes: torch.Tensor
    coords: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def from_bases(cls, bases: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor) -> MultiBitState:
        """Build from unpacked ``bases [G, K, n]`` (signs; zero counts as +1)."""
        weights = (1 << torch.arange(bases.shape[1], device=bases.device))[None, :, None]
        codes = ((bases >= 0).long() * weights).sum(dim=1).to(torch.uint8)
        return cls(codes, coords, mask)

    @property
    def num_groups(self) -> int:
        return self.codes.shape[0]

    @property
    def max_bits(self) -> int:
        return self.mask.shape[1]

    @property
    def group_size(self) -> int:
        return self.codes.shape[1]

    @property
    def bases(self) -> torch.Tensor:
        """``[G, K, n]`` int8 ±1, unpacked from :attr:`codes`."""
        shifts = torch.arange(self.max_bits, device=self.codes.device)[None, :, None]
        return (2 * ((self.codes[:, None, :].long() >> shifts) & 1) - 1).to(torch.int8)

    def rows(self, groups: slice) -> MultiBitState:
        """The state of ``groups`` only, as views (in-place updates reach this state)."""
        return MultiBitState(self.codes[groups], self.coords[groups], self.mask[groups])

    def live_coords(self) -> torch.Tensor:
        """``[G, K]``: coordinates with dead slots zeroed."""
        return self.coords * self.mask

    def codebook(self) -> torch.Tensor:
        """``[G, 2^K]``: the value ``Σ_k mask α_k b_k`` of every pattern ``b`` (:func:`codebook`)."""
        return codebook(self.live_coords())

    def reconstruct(self, block: int = BLOCK) -> torch.Tensor:
        """``[G, n]``: ``Σ_k mask α β`` in the coordinates' dtype, looked up in blocks of about ``block`` weights."""
        codebook, out = self.codebook(), self.coords.new_empty(self.codes.shape)
        for rows in row_blocks(self.num_groups, self.group_size, block):
            torch.gather(codebook[rows], 1, self.codes[rows].long(), out=out[rows])
        return out

    def bits_per_group(self) -> torch.Tensor:
        """``[G]`` int: live slots per group (the group's bitwidth ``I_g``)."""
        return self.mask.sum(dim=1)

    def bits(self) -> int:
        """Binary bits of the layer: ``Σ_g I_g · n``."""
        return int(self.mask.sum()) * self.group_size


def flip_negative(state: MultiBitState, first_moment: torch.Tensor | None = None) -> None:
    """Make every coordinate >= 0 by negating ``(α, β)`` pairs (and that slot's first moment) in place."""
    negative = state.coords < 0
    state.coords.abs_()
    state.codes.bitwise_xor_(slot_bits(negative).to(torch.uint8)[:, None])
    if first_moment is not None:
        first_moment.mul_(1 - 2 * negative.to(first_moment.dtype))


def solve_normal_equations(gram: torch.Tensor, rhs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Solve ``gram [G, K, K] α = rhs [G, K]`` on the live slots of ``mask [G, K]``; dead slots get 0.

    A ridge of ``16·eps`` times the mean live diagonal keeps collinear bases (tiny groups) solvable, so the
    solve never fails and its status is not read back (no host synchronisation); no explicit inverse is formed.
    """
    live = mask.to(gram.dtype)
    gram = gram * (live[:, :, None] * live[:, None, :])
    diagonal = gram.diagonal(dim1=1, dim2=2)
    scale = diagonal.sum(dim=1, keepdim=True) / live.sum(dim=1, keepdim=True).clamp(min=1)
    diagonal.add_(torch.where(mask, 16 * torch.finfo(gram.dtype).eps * scale, 1.0))
    return torch.linalg.solve_ex(gram, rhs * live).result * live


def refit_coords(codes: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted least squares ``argmin_α Σ_j weight_j (Σ_k mask_k α_k β_{j,k} - target_j)²`` per group.

    ``codes [G, n]`` (uint8 or int64 pattern indices), ``mask [G, K]``, ``target, weight [G, n]``
    -> ``coords [G, K]`` (dead slots 0).
    The normal equations depend only on per-pattern sums of ``weight`` and ``weight · target``, so they
    are formed as ``[G, 2^K] @ [2^K, K·K]`` products, without materialising float bases.
    """
    max_bits = mask.shape[1]
    return fit_pattern_sums(pattern_sums(codes, weight, max_bits), pattern_sums(codes, weight * target, max_bits), mask)


def fit_pattern_sums(weight_sums: torch.Tensor, product_sums: torch.Tensor, mask: torch.Tensor,
                     patterns: torch.Tensor | None = None) -> torch.Tensor:
    """Coordinates from per-pattern sums ``[G, 2^K]`` of the weights and of weight · target.

    The normal equations are ``Σ_b s_b b bᵀ α = Σ_b t_b b`` over the ``2^K`` patterns ``b``, the rows of
    ``patterns [2^K, K]`` (default :func:`all_patterns`, ±1).
    """
    max_bits = mask.shape[1]
    if patterns is None:
        patterns = all_patterns(max_bits, weight_sums.dtype, weight_sums.device)
    outer = (patterns[:, :, None] * patterns[:, None, :]).reshape(-1, max_bits * max_bits)
    gram = (weight_sums @ outer).view(-1, max_bits, max_bits)
    return solve_normal_equations(gram, product_sums @ patterns, mask)


def greedy_init(groups: torch.Tensor, max_bits: int, tol: float = 1e-6, block: int = BLOCK) -> MultiBitState:
    """Structured sketching of ``groups [G, n]`` into ``max_bits`` slots, batched over all groups.

    Slot k takes ``β_k = sign(r)`` (sign(0) = +1) of the residual; all coordinates so far are refit by
    least squares (for the first slot that is ``α = mean |w|``); a group stops once ``‖r‖² / ‖w‖² < tol``
    (all-zero groups get no slot). Finally every ``α >= 0`` (sign moved into ``β``) and live slots are
    ordered by ascending ``α``, dead slots last.
    Groups are processed in blocks of about ``block`` weights, which keeps the working set in cache.
    """
    check_max_bits(max_bits)
    if groups.dim() != 2:
        raise ValueError(f"groups must be [num_groups, group_size], got shape {tuple(groups.shape)}")
    w = groups.detach().to(compute_dtype(groups.dtype))
    parts = [_greedy_block(w[rows], max_bits, tol) for rows in row_blocks(w.shape[0], w.shape[1], block)]
    if len(parts) == 1:
        return parts[0]
    return MultiBitState(*(torch.cat([getattr(p, key) for p in parts]) for key in ("codes", "coords", "mask")))


def _greedy_block(w: torch.Tensor, max_bits: int, tol: float) -> MultiBitState:
    """:func:`greedy_init` of ``w [G, n]`` (already in the compute dtype) in one batch."""
    num_groups, group_size = w.shape
    index = torch.full((num_groups, group_size), 2**max_bits - 1, dtype=torch.long, device=w.device)
    coords = torch.zeros(num_groups, max_bits, dtype=w.dtype, device=w.device)
    mask = torch.zeros(num_groups, max_bits, dtype=torch.bool, device=w.device)
    norm = torch.linalg.vector_norm(w, dim=1).square()
    active = norm > 0
    negative = torch.lt(w, 0, out=torch.empty_like(index))
    index.sub_(negative)
    mask[:, 0] = active
    coords[:, 0] = w.abs().mean(dim=1)
    counts, ones, residual = w.new_zeros(num_groups, 2**max_bits), torch.ones_like(w), torch.empty_like(w)
    for k in range(1, max_bits):
        codebook = MultiBitState(index, coords, mask).codebook()
        torch.sub(w, torch.gather(codebook, 1, index, out=residual), out=residual)
        active = active & (torch.linalg.vector_norm(residual, dim=1).square() >= tol * norm)
        index.sub_(torch.lt(residual, 0, out=negative), alpha=1 << k)
        mask[:, k] = active
        counts.zero_().scatter_add_(1, index, ones)
        coords = torch.where(active[:, None], fit_pattern_sums(counts, pattern_sums(index, w, max_bits), mask), coords)
    index |= slot_bits(~mask)[:, None]
    flips = slot_bits(coords < 0)
    coords = coords.abs()
    order = torch.where(mask, coords, torch.inf).argsort(dim=1, stable=True)
    return permute_slots(MultiBitState(index, coords, mask), order, flips)


def permute_slots(state: MultiBitState, order: torch.Tensor, flips: torch.Tensor | None = None) -> MultiBitState:
    """A new state whose slot ``k`` is slot ``order[g, k]`` of ``state`` (``order [G, K]`` per group),
    after negating the bases of the slots set in ``flips [G]`` (bit ``k`` = slot ``k``; coordinates untouched).

    Codes are remapped through a per-group table of all ``2^K`` patterns: one gather over the weights.
    """
    patterns = torch.arange(2**state.max_bits, device=order.device)[None, :]
    if flips is not None:
        patterns = patterns ^ flips[:, None]
    moved = (patterns[:, :, None] >> order[:, None, :]) & 1
    table = (moved << torch.arange(state.max_bits, device=order.device)).sum(dim=2)
    codes = table.gather(1, state.codes.long()).to(torch.uint8)
    return MultiBitState(codes, state.coords.gather(1, order), state.mask.gather(1, order))
