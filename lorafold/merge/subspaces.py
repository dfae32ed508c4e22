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
         first-order condition of the Tucker-2 problem. Sweeps stop when E improves by less
         than `tol` (relative) or after `max_sweeps`.

HOSVD returns the eigenvectors themselves; HOOI rotates P and Q within their spans to the
eigenvectors of Pᵀ G_Q P and Qᵀ H_P Q, largest first. Either way the basis is fixed by the
deltas alone (up to signs), so entry-wise rules on the r×r coordinates do not depend on
how the inputs were factored.
Everything is k×r or smaller; nothing of size m×n, and no k×k decomposition in a sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafold.merge.options import DEFAULT_SUBSPACE
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


def shared_subspaces(stack: FactorStack, rank: int, mode: str = DEFAULT_SUBSPACE, *,
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
