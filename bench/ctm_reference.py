"""CtM's core-space algebra as it was before issue 14, kept for bench/merge_scaling.py only.

The library's lorafold/merge/core_space.py and subspaces.py replaced this (float32 Grams
behind a κ check, partial eigensolvers, one-GEMM stack Grams, float32 sweeps, the full-space
basis at R ≈ p). The benchmark times both side by side on the same inputs; nothing in
lorafold imports this file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafold.merge.methods import MethodInput, MethodOutput, rescaled_weights
from lorafold.merge.report import SubspaceView
from lorafold.merge.rules import flatten_spectrum, numerical_rank
from lorafold.merge.threads import big_op

# Stop when a sweep raises E by less than this (relative). Measured on random T = 8, r = 16
# stacks (flat spectra, HOOI's slowest case): 1e-4 keeps 99.7–99.8 % of the energy gain of
# a run to 1e-9 in 19–27 sweeps instead of 180–350; 1e-3 keeps 99 % in 8–10.
HOOI_TOL = 1e-4
HOOI_MAX_SWEEPS = 100


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

    def grams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ X̃_t X̃_tᵀ and Σ X̃_tᵀ X̃_t, from ρ×ρ products of the factors."""
        lb = self.left.T.reshape(self.count, -1, self.left.shape[0])      # T×ρ×k_B
        rb = self.right.T.reshape(self.count, -1, self.right.shape[0])    # T×ρ×k_A
        inner_l, inner_r = lb @ lb.transpose(1, 2), rb @ rb.transpose(1, 2)
        left = (lb.transpose(1, 2) @ inner_r @ lb).sum(dim=0)
        right = (rb.transpose(1, 2) @ inner_l @ rb).sum(dim=0)
        return left, right

    def total_energy(self) -> float:
        """Σ_t ‖X̃_t‖²_F = Σ_t ⟨L_tᵀL_t, R_tᵀR_t⟩."""
        lb = self.left.T.reshape(self.count, -1, self.left.shape[0])
        rb = self.right.T.reshape(self.count, -1, self.right.shape[0])
        return float(((lb @ lb.transpose(1, 2)) * (rb @ rb.transpose(1, 2))).sum())


def top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The `rank` leading eigenvectors of a symmetric PSD matrix, largest first."""
    with big_op("eigh", 9.0 * gram.shape[0] ** 3):
        _, vectors = torch.linalg.eigh(gram)
    return vectors[:, -rank:].flip(1)


def _orthonormal(image: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """orth(image) (one step of orthogonal iteration), or `basis` unchanged where the image
    has lost a direction (the stack has rank below r there)."""
    q, r = torch.linalg.qr(image)
    diagonal = r.diagonal().abs()
    if bool((diagonal <= diagonal.max() * 1e-12).any()):
        return basis
    return q


def _ritz(basis: torch.Tensor, coords: torch.Tensor, left: bool) -> torch.Tensor:
    """Rotate `basis` to the eigenvectors, largest first, of Σ C_t C_tᵀ (left: Pᵀ G_Q P) or
    Σ C_tᵀ C_t (right: Qᵀ H_P Q)."""
    small = coords @ coords.transpose(1, 2) if left else coords.transpose(1, 2) @ coords
    return basis @ torch.linalg.eigh(small.sum(dim=0))[1].flip(1)


def shared_subspaces(stack: FactorStack, rank: int, mode: str = "hooi", *,
                     tol: float = HOOI_TOL, max_sweeps: int = HOOI_MAX_SWEEPS) -> Subspaces:
    """The rank-r Tucker-2 subspaces of the stack (see the module docstring).

    With N_t = L_tᵀP, M_t = R_tᵀQ and C_t = Pᵀ X̃_t Q = N_tᵀ M_t, the HOOI images are
    G_Q P = Σ L_t M_t C_tᵀ and H_P Q = Σ R_t N_t C_t: two k×Tρ products per half-sweep.
    """
    total = stack.total_energy()
    left_gram, right_gram = stack.grams()
    p = top_eigenvectors(left_gram, rank)
    q = top_eigenvectors(right_gram, rank)
    n, m = stack.project_left(p), stack.project_right(q)
    coords = n.transpose(1, 2) @ m
    start = energy = float(coords.pow(2).sum())
    sweeps = 0
    if mode == "hooi" and total > 0:
        while sweeps < max_sweeps:
            sweeps += 1
            p = _orthonormal(stack.left @ (m @ coords.transpose(1, 2)).flatten(0, 1), p)
            n = stack.project_left(p)
            coords = n.transpose(1, 2) @ m
            q = _orthonormal(stack.right @ (n @ coords).flatten(0, 1), q)
            m = stack.project_right(q)
            coords = n.transpose(1, 2) @ m
            new = float(coords.pow(2).sum())
            improved, energy = new - energy, new
            if improved <= tol * new:
                break
        p = _ritz(p, coords, left=True)
        coords = stack.project_left(p).transpose(1, 2) @ m
        q = _ritz(q, coords, left=False)
    scale = total if total > 0 else 1.0
    return Subspaces(p=p, q=q, mode=mode, sweeps=sweeps, energy=energy / scale,
                     start_energy=start / scale)


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


def merge_ctm(inp: MethodInput) -> MethodOutput:
    space = core_space(inp.factors)
    norms = space.core_norms()
    rank = min(inp.rank, space.left.dim, space.right.dim)
    found = shared_subspaces(space.factor_stack(rescaled_weights(inp.weights, norms, inp.beta)),
                             rank, inp.subspace)
    coordinates = space.coordinates(found.p, found.q)
    merged = inp.rule(coordinates, inp.weights)
    b_small, a_small = split_core(merged, flat=inp.flat_spectrum)
    return MethodOutput(b=space.left.times(found.p @ b_small),
                        a=space.right.times_t(a_small @ found.q.T),
                        view=SubspaceView(b_small @ a_small, coordinates, norms))


def merge_core(inp: MethodInput) -> MethodOutput:
    space = core_space(inp.factors)
    u_b, u_a = space.svd_rotations()
    cores = space.coordinates(u_b, u_a)
    b_small, a_small = split_core(inp.rule(cores, inp.weights), inp.rank,
                                  flat=inp.flat_spectrum)
    return MethodOutput(b=space.left.times(u_b @ b_small), a=space.right.times_t(a_small @ u_a.T),
                        view=SubspaceView(b_small @ a_small, cores, space.core_norms()))
