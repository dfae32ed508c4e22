"""Inputs stacked as they are read equal the per-input upcast the methods had before."""

from __future__ import annotations

import torch

from lorafold.merge.core_space import core_space
from lorafold.merge.factors import StackedFactors, stack_factors, stacked


def stored(seed: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(40, r, generator=g).to(dtype), torch.randn(r, 30, generator=g).to(dtype),
             scale) for r, dtype, scale in ((3, torch.bfloat16, 0.3), (5, torch.float16, 2.0 / 3.0),
                                            (4, torch.float32, 0.1))]


def test_stacked_factors_are_the_upcast_scaled_inputs_bit_for_bit() -> None:
    parts = stored(0)
    factors = stack_factors(parts)
    assert isinstance(factors, StackedFactors) and len(factors) == 3
    for (b, a), (b_t, a_t, scale) in zip(factors, parts, strict=True):
        assert b.dtype == a.dtype == torch.float32
        assert torch.equal(b, b_t.to(torch.float32) * scale)
        assert torch.equal(a, a_t.to(torch.float32))
    assert [pair[0].shape[1] for pair in factors[1:]] == [5, 4]
    b_stack, a_stack = stacked(factors)
    assert b_stack.shape == (40, 12) and a_stack.shape == (12, 30)
    listed = list(factors)
    assert torch.equal(stacked(listed)[0], b_stack) and torch.equal(stacked(listed)[1], a_stack)


def test_core_space_of_stacked_and_listed_inputs_agree() -> None:
    factors = stack_factors(stored(1))
    held, listed = core_space(factors), core_space([(b.clone(), a.clone()) for b, a in factors])
    assert torch.equal(held.r_b, listed.r_b) and torch.equal(held.r_a, listed.r_a)
