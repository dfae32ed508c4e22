"""The core space of a set of LoRA deltas (after Core Space merging, arXiv 2509.17786).

Stack the scaled factors B̂ = [s_1B_1 … s_TB_T] (m×R) and Â = [A_1; …; A_T] (R×n) and take
thin QRs B̂ = Q_B R_B, Âᵀ = Q_A R_A. With R_B^(t), R_A^(t) the columns of task t,

    ΔW_t = s_t B_t A_t = Q_B (R_B^(t) R_A^(t)ᵀ) Q_Aᵀ = Q_B K_t Q_Aᵀ

exactly, so every delta lives in one small k_B×k_A "core" (k = min(dim, R)) and all later
linear algebra is on R×R matrices. Nothing of size m×n is ever formed.

The QRs are most of CtM's flops. They are computed as CholeskyQR in float64: the R×R Gram
matrix B̂ᵀB̂ (one GEMM, half the flops of Householder QR plus forming Q), its Cholesky
factor R, and Q = B̂ R⁻¹ kept implicit (`Basis`), since CtM only ever needs Q times a thin
R×r matrix. The Gram squares the condition number κ: CholeskyQR's error grows like
eps64·κ², float32 Householder QR's like eps32·κ, so the Gram route is the more accurate one
for κ below eps32/eps64 ≈ 5e8 (measured: 1e-3 to 1e-5 of Householder's error for κ from
1e2 to 1e7). Rank-deficient stacks (two inputs sharing a subspace, a zero factor,
R ≥ min(m, n)) and κ near Cholesky's breakdown take float32 Householder QR instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafold.merge.rules import flatten_spectrum, numerical_rank
from lorafold.merge.subspaces import FactorStack
from lorafold.merge.threads import big_op

# Above this estimate of κ(B̂) (columns scaled to unit norm) use Householder QR: it keeps
# CholeskyQR clear of its breakdown near κ ≈ eps64^(-1/2) ≈ 1e8, where eps64·κ² reaches 1.
MAX_GRAM_CONDITION = 1e7


@dataclass(frozen=True)
class Basis:
    """An orthonormal basis Q = X·T of a p-dimensional column space, possibly implicit.

    CholeskyQR keeps X = B̂ (float64) and T = R⁻¹; Householder QR stores Q itself as X
    (float32) with T = None. Products with Q are always taken thin side first.
    """

    x: torch.Tensor
    t: torch.Tensor | None

    @property
    def dim(self) -> int:
        """Number of basis vectors k."""
        return self.x.shape[1] if self.t is None else self.t.shape[1]

    def times(self, small: torch.Tensor) -> torch.Tensor:
        """Q @ small (small is k×j, float64); float32 p×j."""
        small = small.to(self.x.dtype) if self.t is None else self.t @ small
        with big_op("basis", 2.0 * self.x.numel() * small.shape[1]):
            return (self.x @ small).to(torch.float32)

    def times_t(self, rows: torch.Tensor) -> torch.Tensor:
        """rows @ Qᵀ (rows is j×k, float64); float32 j×p."""
        rows = rows.to(self.x.dtype) if self.t is None else rows @ self.t.T
        with big_op("basis", 2.0 * self.x.numel() * rows.shape[0]):
            return (rows @ self.x.T).to(torch.float32)


def gram_qr(x: torch.Tensor, max_condition: float = MAX_GRAM_CONDITION,
            ) -> tuple[Basis, torch.Tensor] | None:
    """CholeskyQR of x (p×R) in float64 with implicit Q, or None where it is not accurate.

    Columns are scaled to unit norm first, so inputs of very different magnitudes do not
    look ill-conditioned; this leaves R unchanged (positive-diagonal QR is unique). Returns
    None when p < R, a column is zero, the Gram is not positive definite or the condition
    estimate ‖R̃‖_F‖R̃⁻¹‖_F (≥ κ₂ of the scaled x) exceeds `max_condition`.
    """
    p, big_r = x.shape
    if p < big_r:
        return None
    x64 = x.to(torch.float64)
    with big_op("gram", 2.0 * p * big_r**2):
        gram = x64.T @ x64
    norms = gram.diagonal().sqrt()
    if not bool((norms > 0).all()):
        return None
    gram = gram / torch.outer(norms, norms)
    lower, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return None
    upper = lower.T
    identity = torch.eye(big_r, dtype=torch.float64, device=x.device)
    inverse = torch.linalg.solve_triangular(upper, identity, upper=True)
    condition = torch.linalg.matrix_norm(upper) * torch.linalg.matrix_norm(inverse)
    if not float(condition) <= max_condition:
        return None
    return Basis(x=x64, t=inverse / norms.unsqueeze(1)), upper * norms


def householder_qr(x: torch.Tensor) -> tuple[Basis, torch.Tensor]:
    """Thin Householder QR in float32: any rank, any shape; R in float64."""
    with big_op("householder", 4.0 * x.shape[0] * x.shape[1] ** 2):
        q, r = torch.linalg.qr(x)
    return Basis(x=q, t=None), r.to(torch.float64)


def thin_qr(x: torch.Tensor) -> tuple[Basis, torch.Tensor]:
    """An orthonormal basis of x's columns and x's coordinates R in it (x = Q R)."""
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
        left = self.r_b.new_zeros(self.r_b.shape[0], len(self.blocks) * width)
        right = self.r_a.new_zeros(self.r_a.shape[0], len(self.blocks) * width)
        for t, s in enumerate(self.blocks):
            columns = slice(t * width, t * width + s.stop - s.start)
            left[:, columns] = self.r_b[:, s] * c[t]
            right[:, columns] = self.r_a[:, s]
        return FactorStack(left=left, right=right, count=len(self.blocks))

    def svd_rotations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """U_B, U_A (k×k) with Q_B U_B and Q_A U_A the left singular vectors of B̂ and Â:
        Core Space merging's bases (B̂ = Q_B R_B and R_B = U_B Σ Vᵀ, so B̂'s are Q_B U_B).
        """
        u_b = torch.linalg.svd(self.r_b, full_matrices=False)[0]
        u_a = torch.linalg.svd(self.r_a, full_matrices=False)[0]
        return u_b, u_a

    def core_norms(self) -> torch.Tensor:
        """‖K_t‖_F for each input: ‖K_t‖² = Σ of block t of (R_BᵀR_B) ⊙ (R_AᵀR_A)."""
        products = (self.r_b.T @ self.r_b) * (self.r_a.T @ self.r_a) * self._same_input()
        squares = torch.zeros(len(self.blocks), dtype=torch.float64, device=self.r_b.device)
        return squares.index_add_(0, self.owner, products.sum(dim=1)).clamp(min=0).sqrt()

    def _same_input(self) -> torch.Tensor:
        return (self.owner.unsqueeze(1) == self.owner.unsqueeze(0)).to(torch.float64)


def core_space(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> CoreSpace:
    """`factors` are (scaled B_t m×r_t, A_t r_t×n) pairs in float32 on one device."""
    left, r_b = thin_qr(torch.cat([b for b, _ in factors], dim=1))
    right, r_a = thin_qr(torch.cat([a for _, a in factors], dim=0).T)
    ranks = [b.shape[1] for b, _ in factors]
    starts = [sum(ranks[:t]) for t in range(len(ranks))]
    owner = torch.repeat_interleave(torch.arange(len(ranks), device=r_b.device),
                                    torch.tensor(ranks, device=r_b.device))
    return CoreSpace(left=left, right=right, r_b=r_b, r_a=r_a, owner=owner,
                     blocks=tuple(slice(s, s + r) for s, r in zip(starts, ranks, strict=True)))


def split_core(core: torch.Tensor, rank: int | None = None, *, flat: bool = False,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """core ≈ (U√Σ)(√Σ Vᵀ): balanced small factors from its SVD, truncated to `rank`.

    Mapped through orthonormal bases this is the best rank-`rank` approximation of the
    delta the core represents, split evenly between B and A. `flat` then replaces the kept
    non-zero singular values by their mean (Iso-C: truncate, then flatten).
    """
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    if rank is not None:
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    if flat:
        s = flatten_spectrum(s, numerical_rank(s, tuple(core.shape), torch.float32))
    root = s.sqrt()
    return u * root, root.unsqueeze(1) * vh
