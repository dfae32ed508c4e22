"""CtM's shared subspaces (Tucker-2 in the core space) against dense references.

The references here form every ΔW_t densely (small modules only) and never touch the core
space: HOSVD as the top singular vectors of the side-by-side deltas, HOOI as alternating
exact SVDs, as tensorly's `partial_tucker` (the CtM authors' solver) does.
"""

from __future__ import annotations

import pytest
import torch

from lorafold.merge import subspaces
from lorafold.merge.core_space import core_space
from lorafold.merge.methods import METHODS, MethodInput, rescaled_weights
from lorafold.merge.rules import RULES, RuleParams, isotropic
from lorafold.merge.subspaces import Subspaces, shared_subspaces

Factors = list[tuple[torch.Tensor, torch.Tensor]]


def trained_like(m: int, n: int, ranks: tuple[int, ...], seed: int,
                 spread: float = 1.0) -> Factors:
    """Factors whose deltas have decaying spectra and norms spread by up to `spread`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, r in enumerate(ranks):
        decay = torch.logspace(0, -1, r)
        b = torch.randn(m, r, generator=g) * decay * spread ** (t / max(len(ranks) - 1, 1))
        out.append((b, torch.randn(r, n, generator=g) / n**0.5))
    return out


def dense_stack(factors: Factors, c: torch.Tensor) -> torch.Tensor:
    return torch.stack([c[t] * (b.double() @ a.double()) for t, (b, a) in enumerate(factors)])


def top_left(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.linalg.svd(matrix, full_matrices=False)[0][:, :rank]


def dense_hooi(stack: torch.Tensor, rank: int, sweeps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HOSVD start, then exact alternating SVDs on the dense m×n deltas."""
    u = top_left(torch.cat(list(stack), dim=1), rank)
    v = top_left(torch.cat(list(stack.transpose(1, 2)), dim=1), rank)
    for _ in range(sweeps):
        u = top_left(torch.cat(list(stack @ v), dim=1), rank)
        v = top_left(torch.cat(list(stack.transpose(1, 2) @ u), dim=1), rank)
    return u, v


def energy(stack: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    return float((u.T @ stack @ v).pow(2).sum() / stack.pow(2).sum())


def projector_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x @ x.T - y @ y.T))


def solve(factors: Factors, rank: int, mode: str, beta: float = 1.0,
          **options: float) -> tuple[Subspaces, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The subspaces and, mapped back to m and n dimensions, U_r and V_r; plus the c_t."""
    space = core_space(factors)
    c = rescaled_weights(torch.ones(len(factors), dtype=torch.float64), space.core_norms(), beta)
    found = shared_subspaces(space.factor_stack(c), rank, mode, **options)  # type: ignore[arg-type]
    u = space.left.times(found.p).double()
    v = space.right.times(found.q).double()
    return found, u, v, c


CASES = [((48, 40), (4, 6, 5), 5, 1.0), ((48, 40), (4, 6, 5), 5, 0.25),
         ((64, 56), (6,) * 5, 8, 1.0), ((64, 56), (6,) * 5, 8, 0.0), ((30, 70), (3, 8), 4, 0.5)]


@pytest.mark.parametrize(("shape", "ranks", "rank", "beta"), CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hooi_captures_at_least_the_hosvd_energy(shape: tuple[int, int], ranks: tuple[int, ...],
                                                 rank: int, beta: float, seed: int) -> None:
    factors = trained_like(*shape, ranks, seed=seed, spread=30.0)
    hosvd, u0, v0, c = solve(factors, rank, "hosvd", beta)
    hooi, u1, v1, _ = solve(factors, rank, "hooi", beta)
    stack = dense_stack(factors, c)
    assert hooi.start_energy == pytest.approx(hosvd.energy, rel=1e-9)
    assert hooi.energy >= hosvd.energy - 1e-12
    assert energy(stack, u1, v1) == pytest.approx(hooi.energy, rel=1e-5)
    assert energy(stack, u0, v0) == pytest.approx(hosvd.energy, rel=1e-5)
    assert hosvd.sweeps == 0 and hooi.sweeps >= 1


@pytest.mark.parametrize(("shape", "ranks", "rank", "beta"), CASES)
def test_hosvd_is_the_dense_hosvd(shape: tuple[int, int], ranks: tuple[int, ...], rank: int,
                                  beta: float) -> None:
    factors = trained_like(*shape, ranks, seed=3, spread=30.0)
    _, u, v, c = solve(factors, rank, "hosvd", beta)
    stack = dense_stack(factors, c)
    u_ref, v_ref = dense_hooi(stack, rank, sweeps=0)
    assert projector_gap(u, u_ref) < 1e-5 and projector_gap(v, v_ref) < 1e-5


@pytest.mark.parametrize(("shape", "ranks", "rank", "beta"), CASES)
def test_hooi_reaches_a_stationary_point(shape: tuple[int, int], ranks: tuple[int, ...],
                                         rank: int, beta: float) -> None:
    """First-order condition of max Σ‖Uᵀ X_t V‖²: U spans an invariant subspace of
    G_V = Σ X_t V Vᵀ X_tᵀ, i.e. (I − UUᵀ) G_V U = 0, and likewise for V."""
    factors = trained_like(*shape, ranks, seed=4, spread=30.0)
    _, u, v, c = solve(factors, rank, "hooi", beta, tol=1e-14, max_sweeps=5000)
    stack = dense_stack(factors, c)
    for x, y, s in ((u, v, stack), (v, u, stack.transpose(1, 2))):
        image = sum(s_t @ y @ y.T @ s_t.T for s_t in s) @ x
        residual = image - x @ (x.T @ image)
        assert float(residual.norm() / image.norm()) < 1e-6


@pytest.mark.parametrize(("shape", "ranks", "rank", "beta"), CASES)
def test_hooi_agrees_with_dense_alternating_svds(shape: tuple[int, int], ranks: tuple[int, ...],
                                                 rank: int, beta: float) -> None:
    factors = trained_like(*shape, ranks, seed=5, spread=30.0)
    found, u, v, c = solve(factors, rank, "hooi", beta, tol=1e-14, max_sweeps=5000)
    stack = dense_stack(factors, c)
    u_ref, v_ref = dense_hooi(stack, rank, sweeps=500)
    assert energy(stack, u_ref, v_ref) == pytest.approx(found.energy, rel=1e-6)
    assert projector_gap(u, u_ref) < 1e-3 and projector_gap(v, v_ref) < 1e-3


@pytest.mark.parametrize("rule", ["ta", "ties", "dare", "dare_ties", "iso", "tsv"])
def test_beta_one_with_hosvd_is_the_previous_ctm(rule: str) -> None:
    """The CtM lorafold had before HOOI and β: top-r singular vectors of the side-by-side
    |w_t|·ΔW_t (and their transposes), coordinates U_rᵀ ΔW_t V_r, the rule, back."""
    factors = trained_like(40, 36, (4, 6, 5), seed=6, spread=10.0)
    weights = [1.0, -0.5, 2.0]
    w = torch.tensor(weights, dtype=torch.float64)
    params = RuleParams(density=0.5, drop=0.3)
    spec = RULES[rule]

    def apply(stack: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        return spec.fn(stack, wts, params, torch.Generator().manual_seed(0))

    out = METHODS["ctm"].fn(MethodInput(factors=factors, weights=w, rank=5, rule=apply,
                                        flat_spectrum=spec.flat_spectrum, beta=1.0,
                                        subspace="hosvd"))
    deltas = dense_stack(factors, torch.ones(3, dtype=torch.float64))
    u, v = dense_hooi(dense_stack(factors, w.abs()), 5, sweeps=0)
    merged = apply(u.T @ deltas @ v, w)
    if spec.flat_spectrum:
        merged = isotropic(merged)
    expected = u @ merged @ v.T
    got = out.b.double() @ out.a.double()
    assert float((got - expected).norm() / expected.norm()) < 1e-4


def test_a_single_input_needs_no_sweep_beyond_its_own_svd() -> None:
    factors = trained_like(40, 30, (6,), seed=7)
    found, u, v, _ = solve(factors, 3, "hooi")
    delta = factors[0][0].double() @ factors[0][1].double()
    u_ref, s, vh = torch.linalg.svd(delta)
    assert projector_gap(u, u_ref[:, :3]) < 1e-5 and projector_gap(v, vh[:3].T) < 1e-5
    assert found.energy == pytest.approx(float(s[:3].pow(2).sum() / s.pow(2).sum()), rel=1e-6)


def random_basis(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


def test_extrapolation_runs_along_the_line_through_both_spans() -> None:
    """Step 0 gives span(old), step 1 span(new); the span found does not depend on which
    bases of the two spans it is given, and its projections Fᵀ·basis, found from old's
    and new's without F, are the ones F gives."""
    factor = torch.randn(40, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def beyond(old: torch.Tensor, new: torch.Tensor, step: float) -> torch.Tensor:
        def project(basis: torch.Tensor) -> torch.Tensor:   # three inputs of rank 4
            return (factor.T @ basis).view(3, 4, -1)

        basis, image = subspaces._beyond(old, project(old), new, project(new), step)
        torch.testing.assert_close(image, project(basis), rtol=0, atol=1e-9)
        return basis

    old, new = random_basis(40, 5, seed=10), random_basis(40, 5, seed=11)
    assert projector_gap(beyond(old, new, 0.0), old) < 1e-10
    assert projector_gap(beyond(old, new, 1.0), new) < 1e-10
    turn_old, turn_new = random_basis(5, 5, seed=12), random_basis(5, 5, seed=13)
    far = beyond(old, new, 2.5)
    assert projector_gap(beyond(old @ turn_old, new @ turn_new, 2.5), far) < 1e-10
    assert projector_gap(far, old) > 0.1 and projector_gap(far, new) > 0.1


@pytest.mark.parametrize("seed", [0, 1])
def test_extrapolation_takes_fewer_sweeps_to_more_energy(seed: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """On flat spectra (plain HOOI's slow case) the extrapolated sweeps stop earlier and
    higher than plain ones (the path below `EXTRAPOLATION_MIN_SIZE`)."""
    g = torch.Generator().manual_seed(seed)
    factors = [(torch.randn(640, 16, generator=g), torch.randn(16, 640, generator=g))
               for _ in range(32)]
    fast, *_ = solve(factors, 16, "hooi")
    monkeypatch.setattr(subspaces, "EXTRAPOLATION_MIN_SIZE", 1 << 40)
    plain, *_ = solve(factors, 16, "hooi")
    assert fast.sweeps < 0.8 * plain.sweeps
    assert fast.energy >= plain.energy
