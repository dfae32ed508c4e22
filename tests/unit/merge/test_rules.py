"""Merge rules against small tensors worked out by hand."""

from __future__ import annotations

import pytest
import torch

from lorafold.errors import InvalidRequest, UnknownRule
from lorafold.merge.rules import (
    RULES,
    RuleParams,
    check_rule_params,
    disjoint_mean,
    elect_sign,
    isotropic,
    resolve_rule,
    trim_by_magnitude,
)

X = torch.tensor([[[3.0, -1.0], [0.5, 2.0]],
                  [[-2.0, -4.0], [1.0, 0.1]]])
W = torch.tensor([1.0, 0.5])


def test_ta_is_the_weighted_sum() -> None:
    merged = RULES["ta"].fn(X, W, RuleParams(scale=2.0), None)
    assert torch.allclose(merged, 2.0 * (X[0] + 0.5 * X[1]))


def test_trim_keeps_the_largest_entries_of_each_input() -> None:
    trimmed = trim_by_magnitude(X, 0.5)
    assert torch.equal(trimmed[0], torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
    assert torch.equal(trimmed[1], torch.tensor([[-2.0, -4.0], [0.0, 0.0]]))


def test_ties_by_hand() -> None:
    # trimmed (density .5) and weighted: t0 = [[3,0],[0,2]], t1 = [[-1,-2],[0,0]]
    # elected signs: [[+, -], [0, +]] -> agreeing means: [[3, -2], [0, 2]]
    merged = RULES["ties"].fn(X, W, RuleParams(density=0.5), None)
    assert torch.allclose(merged, torch.tensor([[3.0, -2.0], [0.0, 2.0]]))


def test_disjoint_mean_averages_only_agreeing_entries() -> None:
    weighted = torch.tensor([[2.0, 1.0], [4.0, -3.0], [0.0, 1.0]])
    sign = elect_sign(weighted)
    assert torch.equal(sign, torch.tensor([1.0, -1.0]))
    assert torch.allclose(disjoint_mean(weighted, sign), torch.tensor([3.0, -3.0]))


def test_dare_is_seeded_and_unbiased() -> None:
    stack = torch.ones(2, 200, 200)
    params = RuleParams(density=0.3)
    first = RULES["dare"].fn(stack, W, params, torch.Generator().manual_seed(7))
    again = RULES["dare"].fn(stack, W, params, torch.Generator().manual_seed(7))
    other = RULES["dare"].fn(stack, W, params, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    kept = first[first != 0]
    # each kept entry is (w_0·m_0 + w_1·m_1) / density with m_t ∈ {0, 1}
    assert set(torch.unique(torch.round(kept * 0.3, decimals=4)).tolist()) <= {0.5, 1.0, 1.5}
    assert abs(float(first.mean()) - 1.5) < 0.05  # E[sum] = Σ w_t = 1.5


def test_dare_ties_with_density_one_equals_ties_without_trimming() -> None:
    params = RuleParams(density=1.0)
    assert torch.allclose(RULES["dare_ties"].fn(X, W, params, torch.Generator()),
                          RULES["ties"].fn(X, W, params, None))


def test_iso_flattens_the_spectrum_and_keeps_the_rank() -> None:
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    matrix = (u[:, :2] * torch.tensor([5.0, 1.0])) @ u[:, 2:4].T
    flat = isotropic(matrix)
    s = torch.linalg.svdvals(flat)
    assert torch.allclose(s[:2], torch.tensor([3.0, 3.0]), atol=1e-5)
    assert float(s[2:].abs().max()) < 1e-5


def test_unknown_rule_and_bad_parameters_are_refused() -> None:
    with pytest.raises(UnknownRule) as err:
        resolve_rule("average")
    assert err.value.code == "unknown_rule"
    with pytest.raises(InvalidRequest) as bad:
        check_rule_params(RULES["ties"], 1.5, 1.0)
    assert bad.value.code == "invalid_parameter"
    with pytest.raises(InvalidRequest):
        check_rule_params(RULES["ta"], 0.5, 1.0)
