"""The core-space algebra at fleet scale (issue 14) against the algebra it replaced
(bench/ctm_reference.py) and dense references, at sizes that take the new routes: float32
Grams, LAPACK's partial eigensolver (k ≥ 128), float32 HOOI sweeps (k·Tρ ≥ 512²), the
full-space basis (R ≥ 0.9·p), split_core's top-r SVD (r ≤ k/4).

Stated tolerances (relative Frobenius unless said):
- EXACT 1e-5: every property exact in exact arithmetic (ta at r = R, core with ta = mtc,
  ΔW_t = Q_B K_t Q_Aᵀ), as in test_methods.
- AGREE 1e-4: new ctm and core against the old ones, and the HOSVD subspaces against the
  dense ones (projector gap); float32 Grams perturb the cores by ~1e-7, the subspaces by
  that over the spectral gap. TIES_AGREE 1e-2 for `core` with ties (see its test).
- top-r energy: the partial solver's top-r eigenvalue sum equals the full solver's to 1e-12.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from lorafold.merge import core_space as cs
from lorafold.merge.methods import METHODS, MethodInput, MethodOutput, rescaled_weights
from lorafold.merge.rules import RULES, RuleParams
from lorafold.merge.subspaces import (
    FLOAT32_SWEEP_SIZE,
    PARTIAL_EIGH_MIN_DIM,
    shared_subspaces,
    top_eigh,
    top_eighs,
)
from lorafold.merge.threads import torch_threads
from tests.unit.bench.bench_loader import load_bench

EXACT = 1e-5
AGREE = 1e-4
TIES_AGREE = 1e-2
Factors = list[tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture(scope="module")
def old() -> ModuleType:
    return load_bench("ctm_reference")


def trained_like(m: int, n: int, ranks: tuple[int, ...], seed: int) -> Factors:
    """Decaying spectra and spread norms, so top-r subspaces are well separated."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, r in enumerate(ranks):
        decay = torch.logspace(0, -1.5, r) * 3.0 ** (t % 4)
        b = torch.randn(m, r, generator=g) * decay
        out.append((b, torch.randn(r, n, generator=g) / n**0.5))
    return out


def case(name: str) -> Factors:
    if name == "mixed_ranks":
        return trained_like(700, 640, (48, 16, 96, 32, 64, 40), seed=1)
    if name == "zero_factor":
        factors = trained_like(700, 640, (160, 96, 160), seed=2)
        factors[1] = (torch.zeros_like(factors[1][0]), factors[1][1])
        return factors
    if name == "shared_subspace":            # input 2 is input 0 with another weight
        factors = trained_like(700, 640, (96, 64, 112), seed=3)
        return [*factors, (factors[0][0] * 0.5, factors[0][1])]
    if name == "full_space":                 # R = 560 ≥ 0.9·n: Q_A = I, Q_B from the Gram
        return trained_like(700, 600, (140, 140, 140, 140), seed=4)
    if name == "wider_than_n":               # R = 640 > n: Q_A = I, and Q_B = I (R ≥ 0.9·m)
        return trained_like(700, 600, (160, 160, 160, 160), seed=5)
    raise AssertionError(name)


CASES = ["mixed_ranks", "zero_factor", "shared_subspace", "full_space", "wider_than_n"]


def run(fn: object, factors: Factors, rank: int, mode: str = "hosvd", rule: str = "ta",
        weights: list[float] | None = None) -> MethodOutput:
    spec = RULES[rule]

    def apply(stack: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return spec.fn(stack, w, RuleParams(density=0.5), torch.Generator().manual_seed(0))

    w = torch.tensor(weights or [1.0 - 0.3 * t for t in range(len(factors))],
                     dtype=torch.float64)
    assert callable(fn)
    out = fn(MethodInput(factors=factors, weights=w, rank=rank, rule=apply,
                         flat_spectrum=spec.flat_spectrum, subspace=mode))
    assert isinstance(out, MethodOutput)
    return out


def dense(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return b.double() @ a.double()


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def projector_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x @ x.T - y @ y.T))


def orthonormal(u: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(u.double())[0]


# --- the QR routes -------------------------------------------------------------------------

def test_a_well_conditioned_stack_takes_the_float32_gram() -> None:
    x = torch.randn(2048, 256, generator=torch.Generator().manual_seed(0))
    x = x * torch.logspace(0, 2, 256)
    basis, r = cs.thin_qr(x)
    assert basis.x is not None and basis.x.dtype == torch.float32 and basis.r is not None
    q = basis.times(torch.eye(basis.dim, dtype=torch.float64)).double()
    assert float(torch.linalg.matrix_norm(q.T @ q - torch.eye(256, dtype=torch.float64), ord=2)) \
        <= cs.FLOAT32_ORTHOGONALITY
    assert rel(q @ r, x.double()) < EXACT


def test_fallbacks_reuse_what_the_float32_gram_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """κ ≈ 1e3: float64 Gram; κ ≈ 1e9 (the float32 Cholesky still finds κ > 1e7 or breaks
    down): Householder, with at most the one float64 Gram a breakdown needs."""
    grams: list[torch.dtype] = []
    real = cs._gram_cholesky

    def counted(x: torch.Tensor, dtype: torch.dtype) -> object:
        grams.append(dtype)
        return real(x, dtype)

    monkeypatch.setattr(cs, "_gram_cholesky", counted)
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(1000, 200, generator=g, dtype=torch.float64))
    mixed, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    for decades, want in ((3.0, torch.float64), (9.0, None)):
        grams.clear()
        x = ((q * torch.logspace(0, -decades, 200, dtype=torch.float64)) @ mixed).float()
        basis, r = cs.thin_qr(x)
        assert grams[0] == torch.float32 and len(grams) <= 2
        if want is None:
            assert basis.r is None                        # Householder
        else:
            assert basis.x is not None and basis.x.dtype == want and grams == [torch.float32, want]
            assert rel(basis.times(r).double(), x.double()) < EXACT


def test_zero_columns_stay_on_the_gram_route() -> None:
    x = torch.randn(500, 40, generator=torch.Generator().manual_seed(6))
    x[:, 10:18] = 0
    basis, r = cs.thin_qr(x)
    assert basis.r is not None and basis.dim == 32
    assert float(r[:, 10:18].abs().max()) == 0.0
    assert rel(basis.times(r).double(), x.double()) < EXACT


def test_near_the_full_space_the_basis_is_the_identity() -> None:
    x = torch.randn(300, 280, generator=torch.Generator().manual_seed(7))
    basis, r = cs.thin_qr(x)
    assert basis.x is None and basis.dim == 300 and torch.equal(r, x.double())
    small = torch.randn(300, 5, dtype=torch.float64)
    assert torch.equal(basis.times(small), small.float())


# --- the partial solvers -------------------------------------------------------------------

@pytest.mark.parametrize("size", [PARTIAL_EIGH_MIN_DIM // 2, PARTIAL_EIGH_MIN_DIM, 600])
def test_top_eigh_is_the_full_eigh_top_r(size: int) -> None:
    x = torch.randn(size, size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    gram = x @ torch.diag(torch.logspace(0, -3, size, dtype=torch.float64)) @ x.T
    values, vectors = top_eigh(gram, 16)
    full_values, full_vectors = torch.linalg.eigh(gram)
    exact = float(full_values[-16:].sum())
    assert float(values.sum()) == pytest.approx(exact, rel=1e-12)
    assert float(torch.trace(vectors.T @ gram @ vectors)) == pytest.approx(exact, rel=1e-12)
    assert bool((values[:-1] >= values[1:]).all())
    assert projector_gap(vectors, full_vectors[:, -16:]) < 1e-6


@pytest.mark.parametrize("threads", [1, 2])
def test_top_eighs_side_by_side_are_each_top_eigh(threads: int) -> None:
    """Two threads: the HOSVD start's two solves run side by side; one: in turn."""
    g = torch.Generator().manual_seed(9)
    grams = [x @ x.T for x in torch.randn(2, 300, 300, generator=g)]
    with torch_threads(threads):
        both = top_eighs(grams, 16)
    for gram, (values, vectors) in zip(grams, both, strict=True):
        one_values, one_vectors = top_eigh(gram, 16)
        assert values.dtype == vectors.dtype == torch.float32
        assert torch.equal(values, one_values) and torch.equal(vectors, one_vectors)


def test_top_eighs_of_two_sizes_takes_each_its_own_route() -> None:
    """k_B ≠ k_A (m or n below R): the small Gram gets the full solver, the large one the
    partial one, as top_eigh gives them."""
    g = torch.Generator().manual_seed(10)
    small, large = (torch.randn(k, k, generator=g, dtype=torch.float64) for k in (40, 300))
    grams = [small @ small.T, large @ large.T]
    for gram, (values, vectors) in zip(grams, top_eighs(grams, 16), strict=True):
        one_values, one_vectors = top_eigh(gram, 16)
        assert torch.equal(values, one_values) and torch.equal(vectors, one_vectors)
        full = torch.linalg.eigvalsh(gram)[-16:].flip(0)
        assert torch.allclose(values, full, rtol=1e-10)


@pytest.mark.parametrize("shape", [(300, 300), (200, 320), (320, 200)])
def test_split_core_top_r_is_the_truncated_svd(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(8)
    core = torch.randn(*shape, generator=g, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, -4, shape[1], dtype=torch.float64)) @ torch.randn(
        shape[1], shape[1], generator=g, dtype=torch.float64)
    b, a = cs.split_core(core, 16)
    u, s, vh = torch.linalg.svd(core)
    best = (u[:, :16] * s[:16]) @ vh[:16]
    assert rel(b @ a, best) < 1e-10
    assert rel(b.T @ b, a @ a.T) < 1e-10                   # split evenly


def test_split_core_top_r_of_a_rank_deficient_core() -> None:
    core = torch.zeros(200, 200, dtype=torch.float64)
    core[:3, :3] = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    b, a = cs.split_core(core, 16)
    assert rel(b @ a, core) < 1e-12 and bool(torch.isfinite(b).all() and torch.isfinite(a).all())
    zero = torch.zeros(200, 200, dtype=torch.float64)
    b, a = cs.split_core(zero, 16)
    assert float((b @ a).abs().max()) == 0.0


# --- whole methods against the old algebra and dense references ----------------------------

@pytest.mark.parametrize("name", CASES[:-1])
def test_ta_at_full_rank_stays_exact(name: str) -> None:
    """ctm is exact with ta at r = R ≤ min(m, n) (P and Q then span whole core spaces); at
    R > n the rank-n sum need not lie in the top n directions of Σ X̃_t X̃_tᵀ."""
    factors = case(name)
    weights = [1.0 - 0.3 * t for t in range(len(factors))]
    expected = sum(w * dense(*f) for w, f in zip(weights, factors, strict=True))
    assert isinstance(expected, torch.Tensor)
    big_r = sum(b.shape[1] for b, _ in factors)
    for method in ("ctm", "core"):
        out = run(METHODS[method].fn, factors, big_r, weights=weights)
        assert rel(dense(out.b, out.a), expected) < EXACT, method


@pytest.mark.parametrize("name", CASES)
def test_core_with_ta_equals_mtc(name: str) -> None:
    factors = case(name)
    core = run(METHODS["core"].fn, factors, 16)
    mtc = run(METHODS["mtc"].fn, factors, 16)
    assert rel(dense(core.b, core.a), dense(mtc.b, mtc.a)) < EXACT


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("rule", ["ta", "ties"])
def test_new_ctm_and_core_equal_the_old(old: ModuleType, name: str, rule: str) -> None:
    """`core` with ties agrees to TIES_AGREE only: its trim keeps a fixed share of the
    k_B×k_A entries, and rounding-sized changes swap entries at the threshold. Where a
    factor is zero, `core` with ties is left out: its space no longer carries that input's
    r_t null directions (the old Householder basis did), and ties's share counts them."""
    factors = case(name)
    for label, new_fn, old_fn in (("ctm", METHODS["ctm"].fn, old.merge_ctm),
                                  ("core", METHODS["core"].fn, old.merge_core)):
        if (label, rule, name) == ("core", "ties", "zero_factor"):
            continue
        new = run(new_fn, factors, 16, "hosvd", rule)
        ref = run(old_fn, factors, 16, "hosvd", rule)
        tolerance = TIES_AGREE if (label, rule) == ("core", "ties") else AGREE
        assert rel(dense(new.b, new.a), dense(ref.b, ref.a)) < tolerance, label


@pytest.mark.parametrize("name", CASES)
def test_hosvd_is_the_dense_hosvd(name: str) -> None:
    factors = case(name)
    space = cs.core_space(factors)
    c = rescaled_weights(torch.ones(len(factors), dtype=torch.float64), space.core_norms(), 1.0)
    stack = space.factor_stack(c)
    assert min(stack.left.shape[0], stack.right.shape[0]) >= PARTIAL_EIGH_MIN_DIM
    found = shared_subspaces(stack, 16, "hosvd")
    deltas = [float(w) * dense(b, a) for w, (b, a) in zip(c, factors, strict=True)]
    u_ref = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)[0][:, :16]
    v_ref = torch.linalg.svd(torch.cat([d.T for d in deltas], dim=1),
                             full_matrices=False)[0][:, :16]
    u = orthonormal(space.left.times(found.p))
    v = orthonormal(space.right.times(found.q))
    assert projector_gap(u, u_ref) < AGREE and projector_gap(v, v_ref) < AGREE


@pytest.mark.parametrize("ranks", [(128,) * 5, (200, 64, 160, 96, 140)])
def test_float32_sweeps_keep_hooi_monotone_and_measured(old: ModuleType,
                                                        ranks: tuple[int, ...]) -> None:
    factors = trained_like(1000, 900, ranks, seed=9)
    space = cs.core_space(factors)
    c = rescaled_weights(torch.ones(len(factors), dtype=torch.float64), space.core_norms(), 0.5)
    stack = space.factor_stack(c)
    assert stack.left.numel() >= FLOAT32_SWEEP_SIZE
    hosvd = shared_subspaces(stack, 16, "hosvd")
    hooi = shared_subspaces(stack, 16, "hooi")
    assert hooi.start_energy == hosvd.energy and hooi.energy >= hosvd.energy
    assert hooi.sweeps >= 1
    # the energy it reports is the energy of the subspaces it returns (float64 recomputation)
    coords = space.coordinates(hooi.p, hooi.q) * c.view(-1, 1, 1)
    assert float(coords.pow(2).sum()) / stack.total_energy() == pytest.approx(hooi.energy,
                                                                                rel=1e-5)
    # and it reaches what the old float64 HOOI reaches on the same stack
    old_space = old.core_space(factors)
    old_found = old.shared_subspaces(old_space.factor_stack(c), 16, "hooi")
    assert hooi.energy == pytest.approx(old_found.energy, rel=1e-3)


@pytest.mark.parametrize("max_sweeps", [0, 1, 3])
def test_float32_sweeps_report_their_float64_energy_and_never_less_than_the_start(
        max_sweeps: int) -> None:
    for seed in range(3):
        factors = trained_like(600, 500, (32,) * 6, seed=seed)
        space = cs.core_space(factors)
        stack = space.factor_stack(torch.ones(len(factors), dtype=torch.float64))
        assert stack.left.numel() >= FLOAT32_SWEEP_SIZE
        found = shared_subspaces(stack, 8, "hooi", max_sweeps=max_sweeps)
        assert found.p.dtype == torch.float64 and found.energy >= found.start_energy
        assert torch.allclose(found.p.T @ found.p, torch.eye(8, dtype=torch.float64),
                              atol=1e-6)      # the start's float32 eigenvectors, or better
        coords = space.coordinates(found.p, found.q)
        kept_start = found.energy == found.start_energy     # measured in float32, then
        assert float(coords.pow(2).sum()) / stack.total_energy() == pytest.approx(
            found.energy, rel=1e-6 if kept_start else 1e-12)
