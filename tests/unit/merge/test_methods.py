"""The properties DESIGN.md §3 says the methods must have, checked on random factors.

Tolerances: fp32 factorisations of O(1) matrices agree with float64 references to ~1e-6
relative; we assert 1e-5 relative Frobenius error for every "exact" property.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lorafold.merge import subspaces
from lorafold.merge.methods import METHODS, MethodInput
from lorafold.merge.rules import RULES, RuleParams

EXACT = 1e-5
M, N = 40, 32


def factor_sets(ranks: tuple[int, ...], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(M, r, generator=g), torch.randn(r, N, generator=g)) for r in ranks]


def run(method: str, factors: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float],
        rank: int, rule: str = "ta", beta: float = 1.0, seed: int = 0, scale: float = 1.0,
        subspace: str = "hooi") -> tuple[torch.Tensor, torch.Tensor]:
    spec = RULES[rule]
    params = RuleParams(density=0.5, scale=scale)

    def apply(stack: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return spec.fn(stack, w, params, torch.Generator().manual_seed(seed))

    return METHODS[method].fn(MethodInput(
        factors=factors, weights=torch.tensor(weights, dtype=torch.float64), rank=rank,
        rule=apply, flat_spectrum=spec.flat_spectrum, beta=beta, subspace=subspace)).factors


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


def truncate_then_flatten(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix)
    return (u[:, :rank] * s[:rank].mean()) @ vh[:rank]


@pytest.mark.parametrize("method", ["mtc", "core"])
def test_iso_after_truncation_is_truncate_then_flatten(method: str) -> None:
    """Iso-C as the CtM paper's merge-then-compress baseline: the best rank-r approximation
    of Σ w_t ΔW_t with its r singular values replaced by their mean."""
    factors = factor_sets((4, 6, 3), seed=8)
    weights = [1.0, 0.5, -1.0]
    total = sum(w * delta(f) for w, f in zip(weights, factors, strict=True))
    assert isinstance(total, torch.Tensor)
    merged = delta(run(method, factors, weights, rank=5, rule="iso"))
    assert rel_err(merged, truncate_then_flatten(total, 5)) < EXACT


def test_core_ties_is_ties_on_cores_in_the_svd_bases() -> None:
    """Core Space merging (arXiv 2509.17786): M_t = U_Bᵀ B_t A_t V_A with U_B the left
    singular vectors of [B_1 … B_T] and V_A the right ones of [A_1; …; A_T], the rule on
    the M_t, then truncation to rank r; here with dense float64 SVDs."""
    factors = factor_sets((4, 6, 3), seed=9)
    weights = [1.0, 0.7, 1.3]
    b64 = torch.cat([b.double() for b, _ in factors], dim=1)
    a64 = torch.cat([a.double() for _, a in factors], dim=0)
    u_b = torch.linalg.svd(b64, full_matrices=False)[0]
    v_a = torch.linalg.svd(a64, full_matrices=False)[2].T
    cores = torch.stack([u_b.T @ delta(f) @ v_a for f in factors])
    merged = RULES["ties"].fn(cores, torch.tensor(weights, dtype=torch.float64),
                              RuleParams(density=0.5), None)
    u, s, vh = torch.linalg.svd(u_b @ merged @ v_a.T)
    expected = (u[:, :5] * s[:5]) @ vh[:5]
    assert rel_err(delta(run("core", factors, weights, rank=5, rule="ties")), expected) < 1e-4


@pytest.mark.parametrize("rule", ["ta", "iso"])
def test_core_equals_mtc_for_rotation_invariant_rules(rule: str) -> None:
    factors = factor_sets((5, 4, 6), seed=10)
    weights = [0.4, -1.0, 0.9]
    assert rel_err(delta(run("core", factors, weights, rank=6, rule=rule)),
                   delta(run("mtc", factors, weights, rank=6, rule=rule))) < EXACT


@pytest.mark.parametrize(("method", "rule", "beta", "subspace"),
                         [(m, r, 1.0, "hooi") for m in ("ctm", "core", "mtc") for r in RULES]
                         + [("ctm", r, b, s) for r in RULES for b in (0.0, 0.25)
                            for s in ("hooi", "hosvd")])
def test_rank_never_exceeds_r(method: str, rule: str, beta: float, subspace: str) -> None:
    merged = run(method, factor_sets((4, 6, 5), seed=3), [1.0, 1.0, -0.5], rank=4, rule=rule,
                 beta=beta, subspace=subspace)
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


@pytest.mark.parametrize(("method", "rule", "beta", "subspace"),
                         [("ctm", r, b, s) for r in RULES for b in (1.0, 0.25, 0.0)
                          for s in ("hooi", "hosvd")]
                         + [("core", "ta", 1.0, "hooi"), ("core", "iso", 1.0, "hooi"),
                            ("mtc", "ties", 1.0, "hooi"), ("mtc", "tsv", 1.0, "hooi")])
def test_gauge_invariance(method: str, rule: str, beta: float, subspace: str) -> None:
    """Splitting ΔW_t differently into B_t, A_t must not change the merge.

    ctm's rules act on coordinates C_t = Pᵀ K_t Q in bases fixed by the deltas alone (up
    to signs, which every rule respects), so every rule, β and subspace mode is invariant.
    `core`'s K_t are expressed in the SVD bases of the stacked factors, which the gauge
    changes, so only rotation-invariant rules (ta, iso) are invariant there.
    """
    factors = factor_sets((4, 6, 5), seed=4)
    weights = [1.0, 0.6, -0.4]
    options = {"rank": 5, "rule": rule, "beta": beta, "subspace": subspace}
    before = delta(run(method, factors, weights, **options))  # type: ignore[arg-type]
    after = delta(run(method, regauge(factors, seed=5), weights, **options))  # type: ignore[arg-type]
    assert rel_err(after, before) < 1e-4


@pytest.mark.parametrize("rule", ["ta", "ties"])
def test_gauge_invariance_with_extrapolated_sweeps(rule: str) -> None:
    """The same at a size where HOOI's sweeps are extrapolated (k·Σr_t ≥ 2¹⁷: 32 inputs of
    rank 16, core space 512) and run in float32: the extrapolation's span does not depend
    on the bases it is given."""
    g = torch.Generator().manual_seed(8)
    factors = [(torch.randn(600, 16, generator=g), torch.randn(16, 560, generator=g))
               for _ in range(32)]
    assert subspaces.EXTRAPOLATION_MIN_SIZE <= 512 * 512
    options = {"rank": 16, "rule": rule, "subspace": "hooi"}
    before = delta(run("ctm", factors, [1.0] * 32, **options))  # type: ignore[arg-type]
    after = delta(run("ctm", regauge(factors, seed=9), [1.0] * 32, **options))  # type: ignore[arg-type]
    assert rel_err(after, before) < 1e-4


def test_ctm_subspaces_ignore_zero_weight_inputs() -> None:
    factors = factor_sets((4, 4), seed=6)
    alone = delta(run("ctm", factors[:1], [1.0], rank=4))
    with_zero = delta(run("ctm", factors, [1.0, 0.0], rank=4))
    assert rel_err(with_zero, alone) < EXACT


@pytest.mark.parametrize("subspace", ["hooi", "hosvd"])
def test_beta_shares_the_subspace_with_a_small_input(subspace: str) -> None:
    """A 100× larger input takes the subspace at β = 1; lower β gives the small one a
    share that grows as β falls."""
    big, small = factor_sets((4, 4), seed=7)
    factors = [(big[0] * 100, big[1]), small]

    def captured(merged: tuple[torch.Tensor, torch.Tensor]) -> float:
        u, _ = torch.linalg.qr(merged[0].double())
        target = delta(small)
        return float((u.T @ target).norm() ** 2 / target.norm() ** 2)

    shares = [captured(run("ctm", factors, [1.0, 1.0], rank=4, beta=beta, subspace=subspace))
              for beta in (1.0, 0.5, 0.0)]
    assert shares[0] + 0.1 < shares[2]
    assert shares[0] <= shares[1] + 1e-9 and shares[1] <= shares[2] + 1e-9


def test_methods_registry_is_complete() -> None:
    assert set(METHODS) == {"ctm", "mtc", "cat", "core"}
    for name, spec in itertools.chain(METHODS.items(), RULES.items()):
        assert spec.name == name
