"""Bitwise reference execution of a packed Linear or Conv2d whose input is quantized (ALGORITHM.md §7).

The layer's input becomes activation codes (each element's nearest level ``γᵀ e``, :func:`nearest_levels`) and
each group ``g`` of the weight adds to its output

    y_g = Σ_k Σ_j α_{g,k} γ_j (β_{g,k}ᵀ b_j)

where ``β_{g,k}ᵀ b_j`` are integer dot products of bit vectors (XOR/AND and popcount,
:func:`~alq_lightning.core.bitwise.multibit_products`) over the inputs the group's weights multiply; only the
weighting by ``α γ`` is floating point (float64). A Conv2d's inputs are its unfolded patches (stride, padding,
dilation, groups); a padded position is marked invalid, since the 0 that padding stands for is not a ±1 level.

Which input each weight multiplies follows from the group layout: :meth:`GroupLayout.to_groups` of the
weight's own flat indices says, per group and position, which weight element it holds, and so which output
and which input (a Linear's feature, a Conv2d's row of the unfolded patch). Every structure keeps a group
inside one output; a layout that does not is refused.

This is a reference for correctness (it equals the float product of ŵ and x̂ up to float rounding), not a
fast kernel: it materialises ``[positions, G, n]`` codes per layer.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..activations import ACT_PREFIX
from ..core import GroupLayout, MultiBitState
from ..core.activations import nearest_levels
from ..core.bitwise import multibit_products
from .format import LAYER_SECTIONS, decode_layer

BITWISE_MODULES = (nn.Linear, nn.Conv2d)


def check_bitwise(name: str, module: nn.Module, coords: torch.Tensor, layout: GroupLayout) -> None:
    """ValueError unless layer ``name`` (``module`` with input coordinates ``coords [C, J]``, weight groups
    ``layout``) can run bitwise: one coordinate vector for the whole input (per-channel ``γ_c`` differ inside a
    dot product, so they cannot be factored out of it), each group inside one output, and for a Conv2d zero
    padding given as numbers or ``"valid"``."""
    if coords.shape[0] != 1:
        raise ValueError(f"layer {name!r} has per-channel input coordinates ({coords.shape[0]} rows): a dot "
                         f"product over several channels cannot factor out one γ per basis, so it cannot run "
                         f"bitwise; load with bitwise=False")
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ValueError(f"layer {name!r}: padding_mode={module.padding_mode!r} cannot run bitwise (only "
                             f"'zeros', whose padding is left out of the dot products)")
        if isinstance(module.padding, str) and module.padding != "valid":
            raise ValueError(f"layer {name!r}: padding={module.padding!r} cannot run bitwise; give the padding as "
                             f"numbers")
    try:
        group_positions(layout, module)
    except ValueError as error:
        raise ValueError(f"layer {name!r}: {error}, so it cannot run bitwise") from None


def group_positions(layout: GroupLayout, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [G, n], outputs [G])`` int64: for each weight of each group the input row it multiplies (a Linear's
    input feature; a Conv2d's row of :func:`torch.nn.functional.unfold`, which runs over all input channels),
    and the output channel of each group."""
    index = layout.to_groups(torch.arange(layout.numel).reshape(layout.shape))
    per_output = layout.numel // layout.shape[0]  # weights of one output: in features, or (Ci/groups)·kh·kw
    owner = index // per_output
    if not torch.equal(owner, owner[:, :1].expand_as(owner)):
        raise ValueError(f"a group of the {layout.describe()} layout on {layout.shape} spans several outputs")
    outputs, within = owner[:, 0], index % per_output
    if isinstance(module, nn.Conv2d):
        # output o reads input channels [q·Ci/groups, (q+1)·Ci/groups) with q = o // (Co/groups): its block of
        # the unfolded rows starts at q·(Ci/groups)·kh·kw = q·per_output
        block = outputs // (module.out_channels // module.groups)
        return block[:, None] * per_output + within, outputs
    return within, outputs


def _conv_args(module: nn.Conv2d) -> dict[str, Any]:
    padding = (0, 0) if isinstance(module.padding, str) else module.padding
    return {"kernel_size": module.kernel_size, "dilation": module.dilation, "padding": padding,
            "stride": module.stride}


def input_columns(module: nn.Module, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(columns [P, R] int64, valid [P, R] bool)``: the activation ``codes`` (shaped like the input) of each of
    the ``P`` output positions (a Linear's input rows; a Conv2d's batch × output pixels) over the ``R`` input rows
    it reads; ``valid`` is False on padding."""
    if isinstance(module, nn.Conv2d):
        args = _conv_args(module)
        batch = codes.shape[0]
        columns = F.unfold(codes.double(), **args)  # codes < 256: exact in float64; padding reads 0
        valid = F.unfold(torch.ones_like(codes[:1], dtype=torch.float64), **args) > 0
        columns = columns.transpose(1, 2).reshape(-1, columns.shape[1]).long()
        valid = valid.transpose(1, 2).expand(batch, -1, -1).reshape(-1, valid.shape[1])
        return columns, valid
    columns = codes.reshape(-1, codes.shape[-1])
    return columns, torch.ones_like(columns, dtype=torch.bool)


def group_inputs(module: nn.Module, layout: GroupLayout, x: torch.Tensor, coords: torch.Tensor,
                 signed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes [P, G, n] int64, valid [P, G, n] bool, outputs [G])``: the activation code of the input each
    weight of each group multiplies at each output position, for input ``x`` and coordinates ``coords [1, J]``."""
    codes = nearest_levels(coords, x.detach().reshape(1, -1), signed).reshape(x.shape)
    rows, outputs = group_positions(layout, module)
    columns, valid = input_columns(module, codes)
    rows = rows.to(x.device)
    return columns[:, rows], valid[:, rows], outputs.to(x.device)


def weight_bits(state: MultiBitState) -> torch.Tensor:
    """``[G, K, n]`` bool: ``β_{g,k} = +1`` (bit ``k`` of the code of each weight)."""
    slots = torch.arange(state.max_bits, device=state.codes.device)
    return ((state.codes.long()[:, None, :] >> slots[None, :, None]) & 1).bool()


def packed_state(module: nn.Module) -> MultiBitState:
    """The decoded multi-bit state of ``module``'s packed ``weight`` (coordinates in float32)."""
    spec = module.alq_packed["weight"]
    sections = (getattr(module, "alq_packed_" + key) for key in LAYER_SECTIONS)
    return decode_layer(*sections, spec.layout.num_groups, spec.layout.group_size, spec.max_bits,
                        spec.coord_dtype, torch.float32)


def bitwise_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of packed ``module`` (Linear or Conv2d) for input ``x``, computed bitwise: integer dot
    products of weight bases and activation bases per group, weighted by ``α γ`` in float64, summed into the
    outputs, plus the bias; in ``x``'s dtype."""
    if isinstance(module, nn.Conv2d) and x.dim() == 3:  # an unbatched [C, H, W] input
        return bitwise_forward(module, x[None])[0]
    state, layout = packed_state(module), module.alq_packed["weight"].layout
    coords = getattr(module, ACT_PREFIX + "coords").view(torch.float32)
    signed = bool(getattr(module, ACT_PREFIX + "signed"))
    codes, valid, outputs = group_inputs(module, layout, x, coords, signed)
    products = multibit_products(weight_bits(state), state.live_coords(), codes, valid, coords[0], signed)
    y = torch.zeros(products.shape[0], layout.shape[0], dtype=torch.float64, device=x.device)
    y.index_add_(1, outputs, products)
    if module.bias is not None:
        y += module.bias.double()
    if isinstance(module, nn.Conv2d):
        batch, height, width = x.shape[0], *x.shape[2:]
        args = _conv_args(module)
        size = [(length + 2 * pad - dil * (kernel - 1) - 1) // step + 1
                for length, pad, dil, kernel, step in zip((height, width), args["padding"], args["dilation"],
                                                          args["kernel_size"], args["stride"])]
        return y.reshape(batch, *size, -1).permute(0, 3, 1, 2).to(x.dtype)
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def make_bitwise(module: nn.Module) -> None:
    """Let packed ``module`` compute bitwise from now on (its ``forward`` becomes :func:`bitwise_forward`)."""
    module.forward = partial(bitwise_forward, module)
