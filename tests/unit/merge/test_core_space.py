"""The core space: CholeskyQR (float64 Gram, implicit Q) against Householder QR, the routes
it falls back on, and the R×R shortcuts CtM takes instead of forming the cores.

Tolerances as in test_methods: 1e-5 relative Frobenius error for every "exact" property.
"""

from __future__ import annotations

import pytest
import torch

from lorafold.merge.core_space import core_space, gram_qr, householder_qr
from lorafold.merge.methods import METHODS, MethodInput, MethodOutput
from lorafold.merge.report import module_report, subspace_report
from lorafold.merge.rules import RULES, RuleParams

EXACT = 1e-5


def gaussian(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def explicit_q(basis_and_r: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    basis, r = basis_and_r
    return basis.times(torch.eye(basis.dim, dtype=torch.float64)).double(), r


def ill_conditioned(m: int, n: int, ranks: tuple[int, ...], condition: float, seed: int,
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B G, G⁻¹ A) with κ(G) = `condition`: the same deltas, badly split into factors."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in ranks:
        b = torch.randn(m, r, generator=g, dtype=torch.float64)
        a = torch.randn(r, n, generator=g, dtype=torch.float64) / n**0.5
        q1, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
        gauge = q1 @ torch.diag(torch.logspace(0, -float(torch.log10(torch.tensor(condition))),
                                               r, dtype=torch.float64)) @ q2
        out.append(((b @ gauge).float(), torch.linalg.solve(gauge, a).float()))
    return out


def merge(method: str, factors: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float],
          rank: int, rule: str = "ta", beta: float = 1.0) -> MethodOutput:
    def apply(stack: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return RULES[rule].fn(stack, w, RuleParams(density=0.5),
                              torch.Generator().manual_seed(0))

    return METHODS[method].fn(MethodInput(
        factors=factors, weights=torch.tensor(weights, dtype=torch.float64), rank=rank,
        rule=apply, flat_spectrum=RULES[rule].flat_spectrum, beta=beta))


def dense(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return b.double() @ a.double()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def test_gram_route_is_an_orthonormal_qr_like_householder() -> None:
    x = gaussian(300, 24, seed=0) * torch.logspace(0, 3, 24)     # columns of mixed scale
    gram = gram_qr(x)
    assert gram is not None
    for q, r in (explicit_q(gram), explicit_q(householder_qr(x))):
        assert float((q.T @ q - torch.eye(q.shape[1], dtype=torch.float64)).abs().max()) < 1e-6
        assert rel_err(q @ r, x.double()) < 1e-6
        assert torch.equal(r, r.triu())
    # positive-diagonal QR is unique: the two R agree up to the signs of their rows
    r_gram, r_house = gram[1], householder_qr(x)[1]
    assert rel_err(r_house * r_house.diagonal().sign().unsqueeze(1), r_gram) < 1e-5


@pytest.mark.parametrize("case", ["duplicate_column", "wide", "near_singular"])
def test_gram_route_declines_what_it_cannot_do_accurately(case: str) -> None:
    x = gaussian(200, 12, seed=1)
    if case == "duplicate_column":
        x = torch.cat([x, x[:, :3]], dim=1)
    elif case == "wide":
        x = gaussian(10, 12, seed=1)
    else:
        x = ill_conditioned(200, 50, (12,), 1e10, seed=2)[0][0]
    assert gram_qr(x) is None


@pytest.mark.parametrize(("method", "case"), [
    ("ctm", "ill_conditioned"), ("core", "ill_conditioned"),
    *((m, c) for m in ("ctm", "core", "cat") for c in ("duplicate_input", "zero_input"))])
def test_ta_at_full_rank_stays_exact(method: str, case: str) -> None:
    """κ = 1e5 factor splits take the Gram route (float32 Householder loses ~1e-3 here);
    inputs that share a subspace or are zero take the Householder route. (cat is left out of
    the first case: it scales B in float32, which such cancelling factors do not survive.)"""
    if case == "ill_conditioned":
        factors = ill_conditioned(120, 90, (6, 6, 6), 1e5, seed=3)
        assert gram_qr(torch.cat([b for b, _ in factors], dim=1)) is not None
    else:
        factors = [(gaussian(60, 5, seed=4), gaussian(5, 40, seed=5)),
                   (gaussian(60, 4, seed=6), gaussian(4, 40, seed=7))]
        extra = factors[0] if case == "duplicate_input" else (torch.zeros(60, 3),
                                                              gaussian(3, 40, seed=8))
        factors.append(extra)
    weights = [1.0, -0.6, 0.8]
    out = merge(method, factors, weights, rank=sum(b.shape[1] for b, _ in factors))
    expected = sum(w * dense(*f) for w, f in zip(weights, factors, strict=True))
    assert isinstance(expected, torch.Tensor)
    assert rel_err(dense(out.b, out.a), expected) < EXACT


def test_r_by_r_shortcuts_match_the_cores() -> None:
    factors = [(gaussian(50, r, seed=10 + r), gaussian(r, 30, seed=20 + r)) for r in (3, 5, 4)]
    space = core_space(factors)
    cores = space.cores()
    c = torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64)
    left, right = space.factor_stack(c).grams()
    assert rel_err(left, sum(w**2 * k @ k.T for w, k in zip(c, cores, strict=True))) < 1e-12
    assert rel_err(right, sum(w**2 * k.T @ k for w, k in zip(c, cores, strict=True))) < 1e-12
    p, q = torch.linalg.qr(gaussian(12, 4, seed=30).double())[0], \
        torch.linalg.qr(gaussian(12, 3, seed=31).double())[0]
    assert rel_err(space.coordinates(p, q), p.T @ cores @ q) < 1e-12
    norms = torch.stack([torch.linalg.matrix_norm(k) for k in cores])
    assert rel_err(space.core_norms(), norms) < 1e-12
    for t, (b, a) in enumerate(factors):
        core_delta = space.left.times(cores[t]).double() @ space.right.times(
            torch.eye(space.right.dim, dtype=torch.float64)).double().T
        assert rel_err(core_delta, dense(b, a)) < EXACT


@pytest.mark.parametrize(("method", "rule", "beta", "rank", "ranks"), [
    ("ctm", "ta", 1.0, 5, (4, 6, 5)),
    ("ctm", "ties", 1.0, 4, (4, 6, 5)),
    ("ctm", "dare", 0.0, 6, (4, 6, 5)),
    ("ctm", "tsv", 0.25, 6, (4, 6, 5)),
    ("ctm", "ta", 1.0, 9, (6,)),            # r > R: the merged core is rank deficient
    ("core", "ties", 1.0, 5, (4, 6, 5)),
    ("core", "iso", 1.0, 5, (4, 6, 5)),
    ("core", "ta", 1.0, 20, (4, 6, 5)),
])
def test_subspace_report_equals_the_factor_report(method: str, rule: str, beta: float,
                                                  rank: int, ranks: tuple[int, ...]) -> None:
    factors = [(gaussian(40, r, seed=40 + r), gaussian(r, 32, seed=50 + r)) for r in ranks]
    weights = [1.0, 0.0, -0.5][:len(ranks)]
    out = merge(method, factors, weights, rank, rule, beta)
    assert out.view is not None
    fast, slow = subspace_report(out.view), module_report(out.factors, factors)
    for got, want in zip(fast, slow, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
