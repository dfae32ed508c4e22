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
    task_singular_vectors,
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


def test_a_cancelling_entry_takes_the_majority_sign() -> None:
    """As in the TIES authors' code: an entry whose weighted sum is exactly 0 is elected
    with the sign most entries got, so its agreeing inputs still count."""
    weighted = torch.tensor([[2.0, 1.0, 3.0], [1.0, 1.0, -3.0]])
    sign = elect_sign(weighted)
    assert torch.equal(sign, torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(disjoint_mean(weighted, sign), torch.tensor([1.5, 1.0, 3.0]))


def test_disjoint_mean_averages_only_agreeing_entries() -> None:
    weighted = torch.tensor([[2.0, 1.0], [4.0, -3.0], [0.0, 1.0]])
    sign = elect_sign(weighted)
    assert torch.equal(sign, torch.tensor([1.0, -1.0]))
    assert torch.allclose(disjoint_mean(weighted, sign), torch.tensor([3.0, -3.0]))


def test_dare_is_seeded_and_unbiased() -> None:
    stack = torch.ones(2, 200, 200)
    params = RuleParams(drop=0.7)
    first = RULES["dare"].fn(stack, W, params, torch.Generator().manual_seed(7))
    again = RULES["dare"].fn(stack, W, params, torch.Generator().manual_seed(7))
    other = RULES["dare"].fn(stack, W, params, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    kept = first[first != 0]
    # each kept entry is (w_0·m_0 + w_1·m_1) / (1 − drop) with m_t ∈ {0, 1}
    assert set(torch.unique(torch.round(kept * 0.3, decimals=4)).tolist()) <= {0.5, 1.0, 1.5}
    assert abs(float(first.mean()) - 1.5) < 0.05  # E[sum] = Σ w_t = 1.5


@pytest.mark.parametrize("density", [1.0, 0.5, 0.25])
def test_dare_ties_without_drop_is_the_full_ties(density: float) -> None:
    """dare_ties = drop → trim → elect → disjoint mean: with nothing dropped it is ties,
    trim included."""
    params = RuleParams(density=density, drop=0.0)
    stack = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(1))
    weights = torch.tensor([1.0, 0.5, 2.0])
    assert torch.equal(RULES["dare_ties"].fn(stack, weights, params, torch.Generator()),
                       RULES["ties"].fn(stack, weights, params, None))


def test_dare_ties_trims_what_dare_kept() -> None:
    params = RuleParams(density=0.25, drop=0.5)
    stack = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(2))
    dropped = RULES["dare"].fn(stack[:1], torch.ones(1), params, torch.Generator().manual_seed(3))
    single = RULES["dare_ties"].fn(stack[:1], torch.ones(1), params,
                                   torch.Generator().manual_seed(3))
    # one input: its sign always wins, so dare_ties is dare's survivors, trimmed to 25 %
    assert int((single != 0).sum()) == 16
    assert torch.equal(single, trim_by_magnitude(dropped.unsqueeze(0), 0.25)[0])


def test_tsv_keeps_orthogonal_inputs_as_they_are() -> None:
    """Inputs in mutually orthogonal directions do not interfere: tsv is their sum."""
    u, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(4)))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(5)))
    first = (u[:, :2] * torch.tensor([3.0, 1.0])) @ v[:, :2].T
    second = (u[:, 2:4] * torch.tensor([2.0, 0.5])) @ v[:, 2:4].T
    merged = task_singular_vectors(torch.stack([first, second]))
    assert torch.allclose(merged, first + second, atol=1e-5)


def test_tsv_orthogonalises_interfering_inputs() -> None:
    """Each input keeps ⌊min(p, q)/T⌋ = 2 directions; the result's singular values are the
    kept ones, its directions orthonormal even where the inputs overlap."""
    stack = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(6)).double()
    merged = task_singular_vectors(stack)
    kept = torch.linalg.svdvals(stack)[:, :2].flatten().sort(descending=True).values
    assert torch.allclose(torch.linalg.svdvals(merged), kept, atol=1e-10)


def test_iso_and_tsv_need_matrices() -> None:
    with pytest.raises(InvalidRequest) as err:
        task_singular_vectors(torch.ones(2, 3))
    assert err.value.code == "invalid_rule_input"


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
    for spec, density, drop in [("ties", 1.5, None), ("ties", float("nan"), None),
                                ("ta", 0.5, None), ("ties", None, 0.3), ("dare", 0.5, None),
                                ("dare", None, 1.0), ("dare_ties", None, -0.1),
                                ("dare_ties", None, float("nan"))]:
        with pytest.raises(InvalidRequest) as bad:
            check_rule_params(RULES[spec], density, drop, 1.0)
        assert bad.value.code == "invalid_parameter"
    with pytest.raises(InvalidRequest, match="drop, the drop rate"):
        check_rule_params(RULES["dare"], 0.5, None, 1.0)
    params = check_rule_params(RULES["dare_ties"], 0.2, 0.6, 2.0)
    assert (params.density, params.drop, params.scale) == (0.2, 0.6, 2.0)
