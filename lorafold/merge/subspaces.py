"""CtM's shared subspaces: a Tucker-2 decomposition of the stack of (rescaled) cores.

Inputs live in one core space (`core_space`): X̃_t = c_t K_t with K_t = L_t R_tᵀ, L_t the
k_B×r_t and R_t the k_A×r_t coordinates of input t's scaled factors. CtM looks for
orthonormal P (k_B×r) and Q (k_A×r) that capture as much of the stack as possible,

    max over P, Q of  E(P, Q) = Σ_t ‖Pᵀ X̃_t Q‖²_F,

the Tucker-2 problem the CtM authors solve with tensorly's `partial_tucker` (modes 0 and 1,
HOSVD start, HOOI). Here:

- hosvd  P, Q = top-r eigenvectors of Σ X̃_t X̃_tᵀ and Σ X̃_tᵀ X̃_t, each side on its own.
- hooi   from the HOSVD start, alternate: P ← the dominant r-dimensional invariant subspace
         of G_Q = Σ X̃_t Q Qᵀ X̃_tᵀ, then Q likewise for H_P = Σ X̃_tᵀ P Pᵀ X̃_t. Each update
         is one step of orthogonal iteration warm-started at the current P (Q): it never
         lowers E (for a PSD G, tr(P'ᵀ G P') ≥ tr(Pᵀ G P) with P' = orth(G P)), costs
         O(k·R·r) from the factors instead of a k×k eigendecomposition, and its fixed
         points are HOOI's: P spans an invariant subspace of G_Q and Q one of H_P, the
         first-order condition of the Tucker-2 problem. From the second sweep on, each
         sweep is followed by an extrapolation: P and Q moved on along the line from where
         the sweep started through where it ended, `step` times as far, kept if E is
         higher there (`_extrapolated`; Bro's line search for ALS), on stacks of
         `EXTRAPOLATION_MIN_SIZE` entries or more. Where the alternation crawls (flat
         spectra) this cuts the sweeps by 1.3–3× and mostly stops higher (21 of 22 stacks
         measured; one stopped 0.2 % lower, at another point); a jump never lowers E.
         Sweeps stop when E improves by less than `tol` (relative) or after `max_sweeps`.

HOSVD returns the eigenvectors themselves; HOOI rotates P and Q within their spans to the
eigenvectors of Pᵀ G_Q P and Qᵀ H_P Q, largest first. Either way the basis is fixed by the
deltas alone (up to signs), so entry-wise rules on the r×r coordinates do not depend on
how the inputs were factored.
Everything is k×r or smaller; nothing of size m×n, and no k×k decomposition in a sweep.

Cost at large R (k up to R, or p on the full-space path): the two k×k Grams are one
symmetric product each (k²R flops, `FactorStack.grams`), and only their top r eigenvectors
are taken, by LAPACK's partial solver (tridiagonalisation, then MRRR for r of the k
eigenpairs: `top_eigh`), as exact as the full solver and 2.5–4.5× faster at k = 1,024–2,048
here; the two run side by side, one per core, where the merge has two threads
(`top_eighs`, `lapack.partial_eighs`). Once the stack is large (`FLOAT32_SWEEP_SIZE`) the
Grams, their eigensolver and the sweeps (the k×R by R×r products, the r×r work and the
QRs) run in float32: a sweep only has to find a better subspace. A sweep that rounding
would make lose energy is undone and ends the run; the subspaces found are
re-orthonormalised in float64 and their energy measured there, and if rounding left that
below the HOSVD start, the start is kept: E never drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from lorafold.merge.gram import gram_matrix
from lorafold.merge.lapack import partial_eighs
from lorafold.merge.options import DEFAULT_SUBSPACE
from lorafold.merge.threads import big_op

# Stop when a sweep raises E by less than this (relative). Measured on random 4096×4096
# stacks of rank-16 inputs (flat spectra, HOOI's slowest case): at T = 8 (R = 128, plain
# sweeps) 1e-4 keeps 99.75 % of the energy gain of a run to 1e-12 in 27 sweeps (153 to
# converge); at T = 32 (R = 512, extrapolated) 99.83 % in 16 (plain sweeps: 99.77 % in 41,
# converged in 289). Trained-like stacks (decaying spectra) stop after 2–5.
HOOI_TOL = 1e-4
HOOI_MAX_SWEEPS = 100
# After every HOOI sweep but the first, try the subspaces this many times as far along
# the sweep's step (`_extrapolated`), kept only where they hold more energy; the factor
# grows after a success and halves (down to this) after a failure. Extrapolation after
# each ALS step is Bro's speed-up for PARAFAC (R. Bro, Multi-way Analysis in the Food
# Industry, 1998). Also extrapolating the first sweep (the largest step, from the HOSVD
# start) saved no sweeps in the cases above. An extrapolation takes no product with the
# factors (`_beyond`), only k×r and smaller work: 84 µs at k = 128 against 90 for a sweep,
# 0.38 ms at k = 1,024 against 1.7–2.4. So it runs from EXTRAPOLATION_MIN_SIZE stack
# entries (k·Tρ) on, i.e. from R = 363 where k = R ≤ m, n. Measured side by side
# (4096×4096, rank 16, 2 cores), the subspace step took 38 against 45 ms at T = 32,
# r = 16 and 192 against 242 at T = 64, but at k = 256 it was 6–7 % slower for two of
# three stacks, and at k = 128 (T = 8, r = 16) 9.5 against 8.2 ms, for 0.1–0.2 % more
# energy.
EXTRAPOLATION_STEP = 2.0
EXTRAPOLATION_GROWTH = 1.5
EXTRAPOLATION_MIN_SIZE = 1 << 17
# Use LAPACK's partial eigensolver from this size on (on the CPU, for at most half of the
# eigenpairs): float64, quiet 2 cores, 15 against 90 ms at k = 256, 39 against 108 at 1,024,
# 222 against 1,026 at 2,048; below 256 both take a few ms. Below PARALLEL_EIGH_MIN_DIM it
# runs on one BLAS thread, and the left and right solves run at once in two threads where
# the merge has two (T = 64, r = 16, 2 cores: the pair 38–42 against 75 ms, the merge
# 0.259 against 0.277 s, medians of 7 alternating; T = 8, r = 128: 0.246 against 0.276):
# its tridiagonalisation is memory-bound, and beside busy processes scipy's OpenBLAS on two
# threads took 1.8× as long as on one (226 against 123 ms at k = 1,024, load ≈ 4).
PARTIAL_EIGH_MIN_DIM = 256
# HOOI's k×R·R×r products, and the stack Grams with their eigensolver, in float32 from this
# many stack entries (k·Tρ) on: 128×128, e.g. T = 8, r = 16. float64 products this small ran
# at a quarter of float32's speed here (128×128 by 128×16: 33 against 8 µs on one thread):
# the subspace step of a T = 8, r = 16 module took 5.8–6.3 ms against 9.8–9.9, for the same
# energy to 8–9 digits. Below it float64 costs next to nothing (it was 512×512 until then).
FLOAT32_SWEEP_SIZE = 1 << 14

# From this k the partial solver gets torch's threads: at k = 4,096 two BLAS threads take
# 2.1 s where one takes 4.9 s (2 cores, quiet), but at k = 1,024 the BLAS threads left
# spinning slowed the HOOI sweeps after it (T = 64, r = 16: 0.45 s against 0.29 s).
PARALLEL_EIGH_MIN_DIM = 2048


@dataclass(frozen=True)
class Subspaces:
    """P (k_B×r), Q (k_A×r), orthonormal, float64; how they were found."""

    p: torch.Tensor
    q: torch.Tensor
    mode: str
    sweeps: int
    energy: float          # E(P, Q) / Σ‖X̃_t‖²: the share of the rescaled stack captured
    start_energy: float    # the same at the HOSVD start


@dataclass(frozen=True)
class FactorStack:
    """X̃_t = L_t R_tᵀ, zero-padded to a common inner width ρ = max r_t and laid side by
    side: `left` is [L_1 … L_T] (k_B×Tρ), `right` is [R_1 … R_T] (k_A×Tρ)."""

    left: torch.Tensor
    right: torch.Tensor
    count: int

    def project_left(self, p: torch.Tensor) -> torch.Tensor:
        """The stack of L_tᵀ P (T×ρ×r)."""
        return (p.T @ self.left).T.reshape(self.count, -1, p.shape[1])

    def project_right(self, q: torch.Tensor) -> torch.Tensor:
        """The stack of R_tᵀ Q (T×ρ×r)."""
        return (q.T @ self.right).T.reshape(self.count, -1, q.shape[1])

    def coordinates(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The stack of Pᵀ X̃_t Q = N_tᵀ M_t (T×r×r), in the stack's dtype."""
        return self.project_left(p).transpose(1, 2) @ self.project_right(q)

    @cached_property
    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[L_1 … L_T]ᵀ and [R_1 … R_T]ᵀ (Tρ×k) laid out row-major, in the precision the
        large products run in (float32 from FLOAT32_SWEEP_SIZE stack entries on): viewed as
        T×ρ×k they are the stack of L_tᵀ (R_tᵀ), and Fᵀ·P runs twice as fast as (Pᵀ·F)ᵀ
        (k = Tρ = 1,024, r = 16, float32: 0.22 against 0.42 ms)."""
        work = torch.float32 if self.left.numel() >= FLOAT32_SWEEP_SIZE else self.left.dtype
        return self.left.T.to(work).contiguous(), self.right.T.to(work).contiguous()

    def _row_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        left_rows, right_rows = self.rows
        return (left_rows.reshape(self.count, -1, left_rows.shape[1]),
                right_rows.reshape(self.count, -1, right_rows.shape[1]))

    @cached_property
    def inner(self) -> tuple[torch.Tensor, torch.Tensor]:
        """L_tᵀL_t and R_tᵀR_t for each t (T×ρ×ρ, batched; computed in the precision of
        `rows`, returned in the stack's dtype): the energies and the Grams are built from
        them."""
        lb, rb = self._row_blocks()
        dtype = self.left.dtype
        return ((lb @ lb.transpose(1, 2)).to(dtype), (rb @ rb.transpose(1, 2)).to(dtype))

    def grams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ X̃_t X̃_tᵀ and Σ X̃_tᵀ X̃_t, each one symmetric product (`gram_matrix`).

        With S_t a square root of R_tᵀR_t (S_tᵀS_t = R_tᵀR_t), X̃_t X̃_tᵀ = (L_t S_tᵀ)(L_t S_tᵀ)ᵀ,
        so the left Gram is YYᵀ for Y = [L_1 S_1ᵀ … L_T S_Tᵀ] (k_B×Tρ), and the right one
        likewise: k²R flops per side. They are formed, and returned, in the precision of
        `rows` (k = R = 4,096: float32 2.3 s against 3.7 s in float64); `top_eigh` then
        solves in that precision too, which loses nothing the Gram's own rounding has not
        already lost.
        """
        lb, rb = self._row_blocks()
        inner_left, inner_right = self.inner
        with big_op("stack_gram", self.left.shape[1] * (
                self.left.shape[0] ** 2 + self.right.shape[0] ** 2)):
            return (gram_matrix((_square_root(inner_right).to(lb.dtype) @ lb).flatten(0, 1)),
                    gram_matrix((_square_root(inner_left).to(rb.dtype) @ rb).flatten(0, 1)))

    def energies(self) -> torch.Tensor:
        """‖X̃_t‖²_F = ⟨L_tᵀL_t, R_tᵀR_t⟩ for each t."""
        inner_left, inner_right = self.inner
        return (inner_left * inner_right).sum(dim=(1, 2))

    def total_energy(self) -> float:
        """Σ_t ‖X̃_t‖²_F."""
        return float(self.energies().sum())


def _square_root(gram: torch.Tensor) -> torch.Tensor:
    """S with SᵀS = gram for a batch of PSD matrices (upper triangular where Cholesky
    works). A zero diagonal entry (padding, or a factor scaled by 0) means a zero row and
    column: it gets a unit diagonal for the Cholesky, which then has e_j as row j, and
    that row is zeroed after. Where Cholesky still fails (a rank-deficient input), the
    eigendecomposition's Λ^½Vᵀ."""
    empty = gram.diagonal(dim1=1, dim2=2) == 0
    lower, info = torch.linalg.cholesky_ex(gram + torch.diag_embed(empty.to(gram.dtype)))
    if not bool(info.any()):
        return lower.transpose(1, 2) * (~empty).to(gram.dtype).unsqueeze(2)
    values, vectors = torch.linalg.eigh(gram)
    return (vectors * values.clamp(min=0).sqrt().unsqueeze(1)).transpose(1, 2)


def top_eigh(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `rank` largest eigenvalues and their eigenvectors of a symmetric matrix, largest
    first, in its dtype: LAPACK's partial solver (syevr) where it is cheaper, else the full
    eigh."""
    return top_eighs([gram], rank)[0]


def top_eighs(grams: Sequence[torch.Tensor], rank: int,
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`top_eigh` of each of a few symmetric matrices. Where they have one size k, the
    partial solver runs on one BLAS thread (PARTIAL_EIGH_MIN_DIM ≤ k < PARALLEL_EIGH_MIN_DIM)
    and the merge has two threads or more, they are solved side by side, one per core
    (`partial_eighs`)."""
    if len({gram.shape[0] for gram in grams}) > 1:
        return [top_eighs([gram], rank)[0] for gram in grams]
    size = grams[0].shape[0]
    rank = min(rank, size)
    if grams[0].device.type != "cpu" or size < PARTIAL_EIGH_MIN_DIM or 2 * rank > size:
        solved = []
        for gram in grams:
            with big_op("eigh", 9.0 * size**3):
                values, vectors = torch.linalg.eigh(gram)
            solved.append((values[-rank:].flip(0), vectors[:, -rank:].flip(1)))
        return solved
    threads = torch.get_num_threads()
    alone = size >= PARALLEL_EIGH_MIN_DIM
    found = partial_eighs([gram.numpy() for gram in grams], rank,
                          blas_threads=threads if alone else 1,
                          parallel=not alone and threads > 1)
    return [(torch.from_numpy(values).to(gram.dtype).flip(0),
             torch.from_numpy(vectors).to(gram.dtype).flip(1))
            for gram, (values, vectors) in zip(grams, found, strict=True)]


# A QR diagonal entry this many units of roundoff below the largest means the image lost a
# direction (1e-12 in float64, as before; 5e-4 in float32, where rounding alone leaves ~1e-7).
_RANK_LOSS_ULPS = 4096


def _orthonormal(image: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """orth(image) (one step of orthogonal iteration), or `basis` unchanged where the image
    has lost a direction (the stack has rank below r there)."""
    q, r = torch.linalg.qr(image)
    diagonal = r.diagonal().abs().tolist()          # r values: one transfer, no more ops
    lost = max(diagonal) * _RANK_LOSS_ULPS * torch.finfo(image.dtype).eps
    return basis if min(diagonal) <= lost else q


def _ritz(basis: torch.Tensor, coords: torch.Tensor, left: bool,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate `basis` to the eigenvectors, largest first, of Σ C_t C_tᵀ (left: Pᵀ G_Q P) or
    Σ C_tᵀ C_t (right: Qᵀ H_P Q); the coordinates C_t in the rotated basis with it."""
    small = coords @ coords.transpose(1, 2) if left else coords.transpose(1, 2) @ coords
    rotation = torch.linalg.eigh(small.sum(dim=0))[1].flip(1)
    return basis @ rotation, (rotation.T @ coords if left else coords @ rotation)


@dataclass(frozen=True)
class _SweepFactor:
    """One side's stacked factor F (L or R, k×Tρ) and its `rows` Fᵀ, both row-major (a
    product with a transposed view runs at half speed), in the precision HOOI's sweeps run
    in; the bases and coordinates of a sweep are in that precision too."""

    factor: torch.Tensor
    factor_t: torch.Tensor
    count: int

    def project(self, basis: torch.Tensor) -> torch.Tensor:
        """The stack of F_tᵀ·basis (T×ρ×r)."""
        return (self.factor_t @ basis).view(self.count, -1, basis.shape[1])

    def image(self, blocks: torch.Tensor) -> torch.Tensor:
        """Σ_t F_t·blocks_t (k×r)."""
        return self.factor @ blocks.flatten(0, 1)


def _sweep_factors(stack: FactorStack) -> tuple[_SweepFactor, _SweepFactor]:
    """Both sides' factors in the precision of `stack.rows` (float32 for large stacks)."""
    left_rows, right_rows = stack.rows
    return (_SweepFactor(stack.left.to(left_rows.dtype), left_rows, stack.count),
            _SweepFactor(stack.right.to(right_rows.dtype), right_rows, stack.count))


@dataclass(frozen=True)
class _SweepState:
    """Bases P, Q, their projections N = Lᵀ·P and M = Rᵀ·Q (stacked), C_t = N_tᵀ M_t and
    E = Σ‖C_t‖²: everything the next sweep starts from."""

    p: torch.Tensor
    q: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor
    coords: torch.Tensor
    energy: float


def _measured(p: torch.Tensor, q: torch.Tensor, n: torch.Tensor, m: torch.Tensor,
              ) -> _SweepState:
    coords = n.transpose(1, 2) @ m
    return _SweepState(p, q, n, m, coords, float(torch.vdot(coords.flatten(), coords.flatten())))


def _state(left: _SweepFactor, right: _SweepFactor, p: torch.Tensor, q: torch.Tensor,
           ) -> _SweepState:
    return _measured(p, q, left.project(p), right.project(q))


def _sweep(left: _SweepFactor, right: _SweepFactor, at: _SweepState) -> _SweepState:
    """One HOOI sweep: P ← orth(G_Q P), then Q ← orth(H_P Q) with the new P."""
    p = _orthonormal(left.image(at.m @ at.coords.transpose(1, 2)), at.p)
    n = left.project(p)
    q = _orthonormal(right.image(n @ (n.transpose(1, 2) @ at.m)), at.q)
    return _measured(p, q, n, right.project(q))


def _beyond(old: torch.Tensor, old_image: torch.Tensor, new: torch.Tensor,
            new_image: torch.Tensor, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis of span(old + step·D), D = new·W⁻¹ − old with W = oldᵀnew, and
    its projections F_tᵀ·basis from those of old and new (`*_image`; a projection is
    linear, so no product with the factor is needed). D is the tangent at span(old) that
    reaches span(new) at step 1 (Edelman, Arias & Smith 1998, SIAM J. Matrix Anal. Appl.
    20(2)). Taken as span((1 − step)·old·W + step·new), the same span times W, so no
    inverse is needed; any bases of the two spans give the same span (gauge invariance).
    Where that matrix loses rank the projections come out non-finite, and so does the
    energy `_extrapolated` compares: the step is not taken."""
    overlap = old.T @ new
    basis, upper = torch.linalg.qr(torch.lerp(old @ overlap, new, step))
    mixed = torch.lerp(old_image.flatten(0, 1) @ overlap, new_image.flatten(0, 1), step)
    image = torch.linalg.solve_triangular(upper, mixed, upper=True, left=False)
    return basis, image.view_as(new_image)


def _extrapolated(before: _SweepState, after: _SweepState, step: float) -> _SweepState | None:
    """The subspaces `step` times as far from `before` as the sweep went (both sides), if
    they hold more energy than the sweep's own; else None."""
    p, n = _beyond(before.p, before.n, after.p, after.n, step)
    q, m = _beyond(before.q, before.m, after.q, after.m, step)
    jump = _measured(p, q, n, m)
    return jump if jump.energy > after.energy else None


def _sweeps(left: _SweepFactor, right: _SweepFactor, start: _SweepState, tol: float,
            max_sweeps: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """HOOI's sweeps from `start`, in the factors' precision, bases and coordinates
    included, so a sweep converts nothing; on stacks of `EXTRAPOLATION_MIN_SIZE` entries
    or more each sweep after the first is followed by an extrapolation. Only rounding can
    make a sweep lose energy; such a sweep is undone and ends the run."""
    at, step, sweeps = start, EXTRAPOLATION_STEP, 0
    extrapolate = left.factor.numel() >= EXTRAPOLATION_MIN_SIZE
    while sweeps < max_sweeps:
        sweeps += 1
        swept = _sweep(left, right, at)
        if swept.energy < at.energy:
            break
        if extrapolate and sweeps > 1:
            jump = _extrapolated(at, swept, step)
            if jump is None:
                step = max(EXTRAPOLATION_STEP, step / 2)
            else:
                step, swept = step * EXTRAPOLATION_GROWTH, jump
        improved, at = swept.energy - at.energy, swept
        if improved <= tol * at.energy:
            break
    return at.p, at.q, sweeps


def shared_subspaces(stack: FactorStack, rank: int, mode: str = DEFAULT_SUBSPACE, *,
                     tol: float = HOOI_TOL, max_sweeps: int = HOOI_MAX_SWEEPS) -> Subspaces:
    """The rank-r Tucker-2 subspaces of the stack (see the module docstring).

    With N_t = L_tᵀP, M_t = R_tᵀQ and C_t = Pᵀ X̃_t Q = N_tᵀ M_t, the HOOI images are
    G_Q P = Σ L_t M_t C_tᵀ and H_P Q = Σ R_t N_t C_t: two k×Tρ products per half-sweep.
    The sweeps' subspaces are re-orthonormalised once in float64 at the end, and the
    energy reported for them is measured there, in float64.
    """
    total = stack.total_energy()
    left_gram, right_gram = stack.grams()
    (_, p), (_, q) = top_eighs([left_gram, right_gram], rank)
    p, q = p.to(stack.left.dtype), q.to(stack.left.dtype)
    del left_gram, right_gram
    left, right = _sweep_factors(stack)
    first = _state(left, right, p.to(left.factor.dtype), q.to(right.factor.dtype))
    start = energy = first.energy
    coords = first.coords
    sweeps = 0
    if mode == "hooi" and total > 0:
        p_end, q_end, sweeps = _sweeps(left, right, first, tol, max_sweeps)
        p_end = torch.linalg.qr(p_end.to(stack.left.dtype))[0]
        q_end = torch.linalg.qr(q_end.to(stack.left.dtype))[0]
        coords_end = stack.coordinates(p_end, q_end)
        energy_end = float(coords_end.pow(2).sum())
        if energy_end >= start:          # float32 sweeps can only round below the start
            p, q, coords, energy = p_end, q_end, coords_end, energy_end
        p, coords = _ritz(p, coords.to(stack.left.dtype), left=True)
        q, _ = _ritz(q, coords, left=False)
    scale = total if total > 0 else 1.0
    return Subspaces(p=p, q=q, mode=mode, sweeps=sweeps, energy=energy / scale,
                     start_energy=start / scale)
