"""The properties DESIGN.md §3 says the methods must have, checked on random factors.

Tolerances: fp32 factorisations of O(1) matrices agree with float64 references to ~1e-6
relative; we assert 1e-5 relative Frobenius error for every "exact" property.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lorafold.merge.methods import METHODS, MethodInput
from lorafold.merge.plan import REFUSED_COMBINATIONS
from lorafold.merge.rules import RULES, RuleParams

EXACT = 1e-5
M, N = 40, 32


def factor_sets(ranks: tuple[int, ...], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(M, r, generator=g), torch.randn(r, N, generator=g)) for r in ranks]


def run(method: str, factors: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float],
        rank: int, rule: str = "ta", balance: bool = False, seed: int = 0, scale: float = 1.0,
        ) -> tuple[torch.Tensor, torch.Tensor]:
    spec = RULES[rule]
    params = RuleParams(density=0.5, scale=scale)

    def apply(stack: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return spec.fn(stack, w, params, torch.Generator().manual_seed(seed))

    return METHODS[method].fn(MethodInput(
        factors=factors, weights=torch.tensor(weights, dtype=torch.float64), rank=rank,
        rule=apply, balance=balance)).factors


def delta(factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return factors[0].double() @ factors[1].double()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("method", ["ctm", "core", "mtc"])
def test_single_adapter_is_reproduced(method: str) -> None:
    factors = factor_sets((6,))
    merged = run(method, factors, [1.0], rank=8)
    assert rel_err(delta(merged), delta(factors[0])) < EXACT


@pytest.mark.parametrize("method", ["ctm", "core", "cat"])
@pytest.mark.parametrize("scale", [1.0, 0.35])
def test_ta_at_full_rank_is_the_scaled_weighted_sum(method: str, scale: float) -> None:
    """λ·Σ w_t ΔW_t: the global scale λ is applied exactly once, by every method."""
    factors = factor_sets((4, 6, 3))
    weights = [1.0, -0.7, 2.5]
    merged = run(method, factors, weights, rank=13, scale=scale)
    expected = scale * sum(w * delta(f) for w, f in zip(weights, factors, strict=True))
    assert isinstance(expected, torch.Tensor)
    assert rel_err(delta(merged), expected) < EXACT


def test_mtc_ta_is_the_truncated_svd_of_the_sum() -> None:
    factors = factor_sets((4, 6, 3), seed=1)
    weights = [1.0, 0.5, -1.0]
    total = sum(w * delta(f) for w, f in zip(weights, factors, strict=True))
    assert isinstance(total, torch.Tensor)
    u, s, vh = torch.linalg.svd(total)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert rel_err(delta(run("mtc", factors, weights, rank=5)), best) < EXACT


def test_core_ta_truncated_equals_mtc_ta() -> None:
    """Both are the best rank-r approximation of the same sum; core never forms it."""
    factors = factor_sets((4, 6, 3), seed=2)
    weights = [0.3, 1.0, 0.8]
    assert rel_err(delta(run("core", factors, weights, rank=5)),
                   delta(run("mtc", factors, weights, rank=5))) < EXACT


@pytest.mark.parametrize(("method", "rule"),
                         [(m, r) for m in ("ctm", "core", "mtc") for r in RULES
                          if (m, r) not in REFUSED_COMBINATIONS])
def test_rank_never_exceeds_r(method: str, rule: str) -> None:
    merged = run(method, factor_sets((4, 6, 5), seed=3), [1.0, 1.0, -0.5], rank=4, rule=rule)
    assert merged[0].shape[1] <= 4 and merged[1].shape[0] <= 4
    assert int(torch.linalg.matrix_rank(delta(merged))) <= 4


def regauge(factors: list[tuple[torch.Tensor, torch.Tensor]], seed: int,
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B, A) -> (B G, G⁻¹ A) with a random well-conditioned invertible G per input."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, a in factors:
        r = b.shape[1]
        q, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
        gauge = q * torch.linspace(0.5, 2.0, r, dtype=torch.float64)
        out.append(((b.double() @ gauge).float(), (torch.linalg.inv(gauge) @ a.double()).float()))
    return out


@pytest.mark.parametrize(("method", "rule", "balance"),
                         [("ctm", r, False) for r in RULES] + [("ctm", "ta", True)]
                         + [("core", "ta", False), ("mtc", "ties", False)])
def test_gauge_invariance(method: str, rule: str, balance: bool) -> None:
    """Splitting ΔW_t differently into B_t, A_t must not change the merge.

    ctm's rules act on coordinates C_t = U_rᵀ ΔW_t V_r, which depend on ΔW_t only, so every
    rule is invariant. `core`'s K_t are expressed in a QR basis that the gauge rotates, so
    only rotation-invariant rules (ta) are invariant there; entry-wise rules are not.
    """
    factors = factor_sets((4, 6, 5), seed=4)
    weights = [1.0, 0.6, -0.4]
    before = delta(run(method, factors, weights, rank=5, rule=rule, balance=balance))
    after = delta(run(method, regauge(factors, seed=5), weights, rank=5, rule=rule,
                      balance=balance))
    assert rel_err(after, before) < 1e-4


def test_ctm_subspaces_ignore_zero_weight_inputs() -> None:
    factors = factor_sets((4, 4), seed=6)
    alone = delta(run("ctm", factors[:1], [1.0], rank=4))
    with_zero = delta(run("ctm", factors, [1.0, 0.0], rank=4))
    assert rel_err(with_zero, alone) < EXACT


def test_ctm_beats_nothing_and_balance_shares_the_subspace() -> None:
    """A 100× larger input takes the subspace; `balance` gives the small one its share."""
    big, small = factor_sets((4, 4), seed=7)
    factors = [(big[0] * 100, big[1]), small]

    def captured(merged: tuple[torch.Tensor, torch.Tensor]) -> float:
        u, _ = torch.linalg.qr(merged[0].double())
        target = delta(small)
        return float((u.T @ target).norm() ** 2 / target.norm() ** 2)

    plain = captured(run("ctm", factors, [1.0, 1.0], rank=4))
    balanced = captured(run("ctm", factors, [1.0, 1.0], rank=4, balance=True))
    assert balanced > plain + 0.1


def test_methods_registry_is_complete() -> None:
    assert set(METHODS) == {"ctm", "mtc", "cat", "core"}
    for name, spec in itertools.chain(METHODS.items(), RULES.items()):
        assert spec.name == name
