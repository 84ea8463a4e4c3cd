"""Bitwise dot products equal the integer dot products of the ±1 / {0,1} vectors they pack."""
from __future__ import annotations

import pytest
import torch

from alq_lightning.core.bitwise import binary_dot, group_dots, multibit_products, pack_bits, popcount


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 100])
def test_packing_keeps_every_bit_in_order(n):
    g = torch.Generator().manual_seed(n)
    bits = torch.rand(3, n, generator=g) < 0.5
    packed = pack_bits(bits)
    assert packed.shape == (3, (n + 7) // 8) and packed.dtype == torch.uint8
    unpacked = [[bool((byte >> k) & 1) for byte in row for k in range(8)][:n] for row in packed.tolist()]
    assert unpacked == bits.tolist()
    assert popcount(packed).tolist() == bits.sum(dim=1).tolist()


@pytest.mark.parametrize("n", [1, 5, 8, 13, 64, 130])
@pytest.mark.parametrize("signed_input", [True, False])
def test_binary_dot_equals_the_integer_dot_product(n, signed_input):
    g = torch.Generator().manual_seed(n + signed_input)
    weights = torch.rand(4, n, generator=g) < 0.5
    inputs = torch.rand(5, n, generator=g) < 0.5
    beta = weights.long() * 2 - 1
    b = inputs.long() * 2 - 1 if signed_input else inputs.long()
    expected = beta @ b.T
    result = binary_dot(pack_bits(weights), pack_bits(inputs), n, signed_input)
    assert result.dtype == torch.int64 and torch.equal(result, expected)


def test_a_multibit_product_from_binary_dots_equals_the_float_product():
    """``y = Σ_k Σ_j α_k γ_j (β_kᵀ b_j)`` equals ``ŵᵀ x̂`` for ``ŵ = Σ_k α_k β_k``, ``x̂ = Σ_j γ_j b_j``."""
    g = torch.Generator().manual_seed(0)
    n, weight_bits, act_bits = 37, 3, 2
    beta = torch.rand(weight_bits, n, generator=g) < 0.5
    b = torch.rand(act_bits, n, generator=g) < 0.5
    alpha = torch.rand(weight_bits, dtype=torch.float64, generator=g)
    gamma = torch.rand(act_bits, dtype=torch.float64, generator=g)
    w_hat = alpha @ (beta.double() * 2 - 1)
    x_hat = gamma @ b.double()
    dots = binary_dot(pack_bits(beta), pack_bits(b), n, signed_input=False)
    assert torch.allclose(alpha @ dots.double() @ gamma, w_hat @ x_hat, rtol=1e-12)


@pytest.mark.parametrize("signed_input", [True, False])
def test_group_products_equal_the_float_products_of_the_bases_over_valid_inputs(signed_input):
    """Per group, ``Σ_k Σ_j α_k γ_j (β_kᵀ b_j)`` over the valid inputs equals ``ŵ_gᵀ x̂`` with padding as 0; the
    integer dots equal the float dots exactly."""
    g = torch.Generator().manual_seed(3)
    batch, groups, n, weight_bits, act_bits = 3, 5, 11, 4, 3
    beta = torch.rand(groups, weight_bits, n, generator=g) < 0.5
    alpha = torch.rand(groups, weight_bits, dtype=torch.float64, generator=g)
    alpha[0, 1] = 0.0  # a dead slot
    codes = torch.randint(0, 2**act_bits, (batch, groups, n), generator=g)
    valid = torch.rand(batch, groups, n, generator=g) < 0.8
    gamma = torch.rand(act_bits, dtype=torch.float64, generator=g)
    planes = torch.stack([(codes >> j) & 1 for j in range(act_bits)]).double()  # [J, B, G, n]
    e = planes * 2 - 1 if signed_input else planes
    signs = beta.double() * 2 - 1
    float_dots = torch.einsum("gkn,jbgn->jbgk", signs, e * valid.double())
    for j in range(act_bits):
        dots = group_dots(pack_bits(beta), pack_bits((codes >> j) & 1 == 1), pack_bits(valid), signed_input)
        assert torch.equal(dots, float_dots[j].long())
    w_hat = (alpha[:, :, None] * signs).sum(dim=1)  # [G, n]
    x_hat = torch.einsum("j,jbgn->bgn", gamma, e) * valid.double()
    expected = (w_hat[None] * x_hat).sum(dim=2)
    result = multibit_products(beta, alpha, codes, valid, gamma, signed_input)
    assert torch.allclose(result, expected, rtol=1e-12, atol=1e-12)
