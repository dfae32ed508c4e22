"""The core space of a set of LoRA deltas (after Core Space merging, arXiv 2509.17786).

Stack the scaled factors B̂ = [s_1B_1 … s_TB_T] (m×R) and Â = [A_1; …; A_T] (R×n) and take
thin QRs B̂ = Q_B R_B, Âᵀ = Q_A R_A. With R_B^(t), R_A^(t) the columns of task t,

    ΔW_t = s_t B_t A_t = Q_B (R_B^(t) R_A^(t)ᵀ) Q_Aᵀ = Q_B K_t Q_Aᵀ

exactly, so every delta lives in one small k_B×k_A "core" (k = min(dim, R)) and all later
linear algebra is on R×R matrices. Nothing of size m×n is ever formed.

The QRs are most of CtM's flops. They are CholeskyQR: the R×R Gram matrix B̂ᵀB̂ (one GEMM,
half the flops of Householder QR plus forming Q), its Cholesky factor R, and Q = B̂ R⁻¹
kept implicit (`Basis`), since CtM only ever needs Q times a thin R×r matrix. The Gram
squares the condition number κ: CholeskyQR loses orthogonality like u·κ² (u the Gram's
unit roundoff), float32 Householder QR like eps32 but its R errs like eps32·κ. So:

- float32 Gram first (float64 GEMM runs at a third to a half of float32 here). Its Cholesky
  factor gives κ of the column-scaled stack (a few power iterations, O(R²) each); where
  the measured loss of orthogonality, at most u32·(2κ² + 8) for κ ≤ 100 (4096×1024 and
  ×2048 stacks), stays below `FLOAT32_ORTHOGONALITY` the basis is float32 and so are its
  products. Random factors of rank R ≤ m/2 have κ ≤ 6 and take this route.
- otherwise float64, as before: the float32 Cholesky already told whether it can work
  (κ ≤ `MAX_GRAM_CONDITION`); if not, Householder QR straight away, never a float64 Gram
  thrown away. Only when the float32 Cholesky broke down (κ ≳ 4e3, or the stack is
  rank deficient: two inputs sharing a subspace) is a float64 Gram tried before Householder.
- exactly zero columns (an input with a zero factor) are left out of the basis, not a
  reason to fall back: their coordinates are zero.
- R ≥ `FULL_SPACE_FRACTION`·p: the basis is the identity of R^p (Q = I, R = the stack),
  exact and free. The core is then p-dimensional; the subspace step never forms p×p
  decompositions it does not need (see subspaces.py), so this is cheaper than a Gram
  whose cost pR² reaches p³ there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafold.merge.factors import stacked
from lorafold.merge.gram import gram_matrix
from lorafold.merge.rules import flatten_spectrum, numerical_rank
from lorafold.merge.subspaces import FactorStack, top_eigh
from lorafold.merge.threads import big_op

# Above this κ (columns scaled to unit norm) use Householder QR: it keeps CholeskyQR clear
# of its breakdown near κ ≈ eps64^(-1/2) ≈ 1e8, where eps64·κ² reaches 1.
MAX_GRAM_CONDITION = 1e7
# Accepted loss of orthogonality ‖QᵀQ − I‖₂ of a float32-Gram basis: the size of float32
# rounding in one 4096-long dot product (√4096·eps32 ≈ 4e-6), so below what the float32
# factor products that follow lose anyway.
FLOAT32_ORTHOGONALITY = 1e-5
# At R ≥ this fraction of p a side's basis is the identity. Measured (bench/merge_scaling.py,
# 4096×4096): at R = 2048 the Gram route is faster (the core stays 2048-dimensional); at
# R = p the Gram cannot be smaller than the space. Between, the identity costs at most
# (p/R)× more in the subspace step, which at R ≥ 0.9p is below the Gram's pR².
FULL_SPACE_FRACTION = 0.9
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
_POWER_STEPS = 12


@dataclass(frozen=True)
class Basis:
    """An orthonormal basis Q of a k-dimensional subspace of R^p, kept implicit.

    Q = x · r⁻¹ with r upper triangular (CholeskyQR), Q = x (Householder: r is None), or
    Q = I_p (x is None). Products with Q are taken thin side first, in x's dtype.
    """

    x: torch.Tensor | None
    r: torch.Tensor | None
    size: int                 # p

    @property
    def dim(self) -> int:
        """Number of basis vectors k."""
        return self.size if self.x is None else self.x.shape[1]

    def _solve(self, small: torch.Tensor) -> torch.Tensor:
        if self.r is None:
            return small
        return torch.linalg.solve_triangular(self.r, small.to(self.r.dtype), upper=True)

    def times(self, small: torch.Tensor) -> torch.Tensor:
        """Q @ small (small is k×j); float32 p×j."""
        if self.x is None:
            return small.to(torch.float32)
        small = self._solve(small).to(self.x.dtype)
        with big_op("basis", 2.0 * self.x.numel() * small.shape[1]):
            return (self.x @ small).to(torch.float32)

    def times_t(self, rows: torch.Tensor) -> torch.Tensor:
        """rows @ Qᵀ (rows is j×k); float32 j×p."""
        return self.times(rows.T).T


def _condition(gram: torch.Tensor, upper: torch.Tensor) -> float:
    """κ₂ of the Cholesky factor R of `gram` (gram = RᵀR) by power iteration on gram and on
    its inverse (two triangular solves with R). One product with gram per step, not two
    with R: 0.32 against 0.39 ms at 128×128, 5.1 against 6.6 at 1,024²."""
    start = torch.ones(upper.shape[0], 1, dtype=upper.dtype, device=upper.device)
    big, small = start, start
    top = bottom = 1.0
    for _ in range(_POWER_STEPS):
        big = gram @ big
        top = float(big.norm())
        big = big / top
        small = torch.linalg.solve_triangular(
            upper, torch.linalg.solve_triangular(upper.T, small, upper=False), upper=True)
        bottom = float(small.norm())
        small = small / bottom
    return (top * bottom) ** 0.5


@dataclass(frozen=True)
class _Cholesky:
    upper: torch.Tensor | None     # R of the column-scaled kept columns; None: broke down
    norms: torch.Tensor            # the kept columns' norms
    kept: torch.Tensor             # indices of the non-zero columns
    condition: float               # κ₂ of the scaled kept columns (inf: broke down)


def _gram_cholesky(x: torch.Tensor, dtype: torch.dtype) -> _Cholesky | None:
    """Cholesky of x's column-scaled Gram, all in `dtype` (the factor and norms returned in
    float64); None where the Gram did not come out finite or lost a non-zero column to
    underflow.

    In float32 the factorisation adds rounding of the size the float32 Gram already has,
    and only a basis with κ ≤ 9 is kept from it (`FLOAT32_ORTHOGONALITY`); it breaks down
    where the float32 Gram stops being safely positive definite (κ ≳ 4e3), as a float64
    factorisation of that Gram did. At R = 1,024: 10.8 against 16.8 ms (2 cores)."""
    xd = x.to(dtype)
    with big_op("gram", 2.0 * x.shape[0] * x.shape[1] ** 2):
        gram = gram_matrix(xd)
    squares = gram.diagonal()
    if not bool(torch.isfinite(squares).all()):
        return None
    kept = torch.nonzero(squares > 0).squeeze(1)
    every = kept.numel() == x.shape[1]
    if not every and bool(x[:, squares <= 0].any()):
        return None
    norms = squares[kept].sqrt()
    scaled = gram if every else gram[kept][:, kept]          # our own copy: scaled in place
    scaled.div_(norms.unsqueeze(0)).div_(norms.unsqueeze(1))
    lower, info = torch.linalg.cholesky_ex(scaled)
    norms = norms.to(torch.float64)
    if int(info) != 0:
        return _Cholesky(None, norms, kept, float("inf"))
    upper = lower.T
    return _Cholesky(upper.to(torch.float64), norms, kept, _condition(scaled, upper))


def _from_cholesky(x: torch.Tensor, chol: _Cholesky, dtype: torch.dtype,
                   ) -> tuple[Basis, torch.Tensor]:
    assert chol.upper is not None
    r_kept = chol.upper * chol.norms          # R of the kept columns, unscaled
    if chol.kept.numel() == x.shape[1]:
        return Basis(x=x.to(dtype), r=r_kept, size=x.shape[0]), r_kept
    r = r_kept.new_zeros(r_kept.shape[0], x.shape[1])
    r[:, chol.kept] = r_kept
    return Basis(x=x[:, chol.kept].to(dtype), r=r_kept, size=x.shape[0]), r


def gram_qr(x: torch.Tensor, max_condition: float = MAX_GRAM_CONDITION,
            ) -> tuple[Basis, torch.Tensor] | None:
    """CholeskyQR of x (p×R) with implicit Q, in float32 where accurate, else float64; None
    where neither is (p < R, rank deficient, κ above `max_condition`).

    Columns are scaled to unit norm for the factorisation and the condition estimate, so
    inputs of very different magnitudes do not look ill-conditioned; exactly zero columns
    are left out of Q and get zero coordinates in R.
    """
    if x.shape[0] < x.shape[1]:
        return None
    fast = _gram_cholesky(x, torch.float32)
    if fast is not None and fast.upper is not None:
        loss = _UNIT_ROUNDOFF[torch.float32] * (2.0 * fast.condition**2 + 8.0)
        if loss <= FLOAT32_ORTHOGONALITY:
            return _from_cholesky(x, fast, torch.float32)
        if not fast.condition <= max_condition:
            return None
    slow = _gram_cholesky(x, torch.float64)
    if slow is None or slow.upper is None or not slow.condition <= max_condition:
        return None
    return _from_cholesky(x, slow, torch.float64)


def householder_qr(x: torch.Tensor) -> tuple[Basis, torch.Tensor]:
    """Thin Householder QR in float32: any rank, any shape; R in float64."""
    with big_op("householder", 4.0 * x.shape[0] * x.shape[1] ** 2):
        q, r = torch.linalg.qr(x)
    return Basis(x=q, r=None, size=x.shape[0]), r.to(torch.float64)


def full_space(x: torch.Tensor) -> tuple[Basis, torch.Tensor]:
    """Q = I_p, R = x: the exact basis when R is about p or more."""
    return Basis(x=None, r=None, size=x.shape[0]), x.to(torch.float64)


def thin_qr(x: torch.Tensor) -> tuple[Basis, torch.Tensor]:
    """An orthonormal basis of x's columns and x's coordinates R in it (x = Q R)."""
    if x.shape[1] >= FULL_SPACE_FRACTION * x.shape[0]:
        return full_space(x)
    return gram_qr(x) or householder_qr(x)


@dataclass(frozen=True)
class CoreSpace:
    """ΔW_t = Q_B K_t Q_Aᵀ with K_t = R_B[:, t] R_A[:, t]ᵀ; `owner[j]` is column j's input."""

    left: Basis                  # Q_B, m×k_B
    right: Basis                 # Q_A, n×k_A
    r_b: torch.Tensor            # k_B×R, float64
    r_a: torch.Tensor            # k_A×R, float64
    owner: torch.Tensor          # R, int64: which input each column belongs to
    blocks: tuple[slice, ...]    # input t's columns

    def cores(self) -> torch.Tensor:
        """The stack of K_t (T×k_B×k_A, float64)."""
        return torch.stack([self.r_b[:, s] @ self.r_a[:, s].T for s in self.blocks])

    def coordinates(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The stack of Pᵀ K_t Q (T×r×r), without forming the K_t."""
        left, right = p.T @ self.r_b, self.r_a.T @ q
        return torch.stack([left[:, s] @ right[s] for s in self.blocks])

    def factor_stack(self, c: torch.Tensor) -> FactorStack:
        """The stack of c_t·K_t as factors (c_t R_B^(t), R_A^(t)) padded to a common width,
        for `subspaces`."""
        width = max(s.stop - s.start for s in self.blocks)
        scale = c.to(self.r_b.dtype)
        if width * len(self.blocks) == self.r_b.shape[1]:       # equal ranks: no padding
            return FactorStack(left=self.r_b * scale[self.owner], right=self.r_a,
                               count=len(self.blocks))
        left = self.r_b.new_zeros(self.r_b.shape[0], len(self.blocks) * width)
        right = self.r_a.new_zeros(self.r_a.shape[0], len(self.blocks) * width)
        for t, s in enumerate(self.blocks):
            columns = slice(t * width, t * width + s.stop - s.start)
            left[:, columns] = self.r_b[:, s] * scale[t]
            right[:, columns] = self.r_a[:, s]
        return FactorStack(left=left, right=right, count=len(self.blocks))

    def svd_rotations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """U_B, U_A (k×k) with Q_B U_B and Q_A U_A the left singular vectors of B̂ and Â:
        Core Space merging's bases (B̂ = Q_B R_B and R_B = U_B Σ Vᵀ, so B̂'s are Q_B U_B).
        All k are needed (entry-wise rules act on every coordinate)."""
        u_b = torch.linalg.svd(self.r_b, full_matrices=False)[0]
        u_a = torch.linalg.svd(self.r_a, full_matrices=False)[0]
        return u_b, u_a

    def core_norms(self) -> torch.Tensor:
        """‖K_t‖_F for each input: ‖K_t‖² = ⟨R_B^(t)ᵀR_B^(t), R_A^(t)ᵀR_A^(t)⟩, from the
        ρ×ρ diagonal blocks only (k·R·ρ flops, not the k·R² of the whole R×R products),
        batched over the inputs."""
        ones = torch.ones(len(self.blocks), dtype=self.r_b.dtype, device=self.r_b.device)
        return self.factor_stack(ones).energies().clamp(min=0).sqrt()


def core_space(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> CoreSpace:
    """`factors` are (scaled B_t m×r_t, A_t r_t×n) pairs in float32 on one device."""
    b_stack, a_stack = stacked(factors)
    left, r_b = thin_qr(b_stack)
    right, r_a = thin_qr(a_stack.T)
    ranks = [b.shape[1] for b, _ in factors]
    starts = [sum(ranks[:t]) for t in range(len(ranks))]
    owner = torch.repeat_interleave(torch.arange(len(ranks), device=r_b.device),
                                    torch.tensor(ranks, device=r_b.device))
    return CoreSpace(left=left, right=right, r_b=r_b, r_a=r_a, owner=owner,
                     blocks=tuple(slice(s, s + r) for s, r in zip(starts, ranks, strict=True)))


# split_core takes only the top `rank` singular triplets, from the smaller Gram's partial
# eigendecomposition, when rank ≤ min(shape)/4 (then the Gram plus syevr cost about a
# quarter of the full SVD: 60 against 240 ms at 1,024², float64, quiet).
_TOP_SVD_FRACTION = 4


def _top_svd(core: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `rank` singular triplets of core, from the eigenpairs of its smaller Gram:
    exact to rounding in ‖core‖²·eps64 (the singular values kept are the large ones)."""
    wide = core.shape[0] <= core.shape[1]
    side = core if wide else core.T
    values, u = top_eigh(side @ side.T, rank)
    s = values.clamp(min=0).sqrt()
    live = s > s[0] * 1e-7 if bool(s.numel()) and float(s[0]) > 0 else s > 0
    v = torch.where(live, side.T @ u / torch.where(live, s, 1.0), 0.0)
    s = torch.where(live, s, 0.0)
    return (u, s, v.T) if wide else (v, s, u.T)


def split_core(core: torch.Tensor, rank: int | None = None, *, flat: bool = False,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """core ≈ (U√Σ)(√Σ Vᵀ): balanced small factors from its SVD, truncated to `rank`.

    Mapped through orthonormal bases this is the best rank-`rank` approximation of the
    delta the core represents, split evenly between B and A. `flat` then replaces the kept
    non-zero singular values by their mean (Iso-C: truncate, then flatten).
    """
    if rank is not None and rank * _TOP_SVD_FRACTION <= min(core.shape):
        u, s, vh = _top_svd(core, rank)
    else:
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        if rank is not None:
            u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    if flat:
        s = flatten_spectrum(s, numerical_rank(s, tuple(core.shape), torch.float32))
    root = s.sqrt()
    return u * root, root.unsqueeze(1) * vh
