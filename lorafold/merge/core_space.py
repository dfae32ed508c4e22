"""The core space of a set of LoRA deltas (after Core Space merging, arXiv 2509.17786).

Stack the scaled factors B̂ = [s_1B_1 … s_TB_T] (m×R) and Â = [A_1; …; A_T] (R×n) and take
thin QRs B̂ = Q_B R_B, Âᵀ = Q_A R_A. With R_B^(t), R_A^(t) the columns of task t,

    ΔW_t = s_t B_t A_t = Q_B (R_B^(t) R_A^(t)ᵀ) Q_Aᵀ = Q_B K_t Q_Aᵀ

exactly, so every delta lives in one small k_B×k_A "core" (k = min(dim, R)) and all later
linear algebra is on R×R matrices. Nothing of size m×n is ever formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CoreSpace:
    q_b: torch.Tensor            # m×k_B, orthonormal columns
    q_a: torch.Tensor            # n×k_A, orthonormal columns
    cores: list[torch.Tensor]    # K_t, k_B×k_A, float64


def core_space(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> CoreSpace:
    """`factors` are (scaled B_t m×r_t, A_t r_t×n) pairs in float32 on one device."""
    b_hat = torch.cat([b for b, _ in factors], dim=1)
    a_hat = torch.cat([a for _, a in factors], dim=0)
    q_b, r_b = torch.linalg.qr(b_hat)
    q_a, r_a = torch.linalg.qr(a_hat.T)
    r_b, r_a = r_b.double(), r_a.double()
    cores: list[torch.Tensor] = []
    start = 0
    for b, _ in factors:
        stop = start + b.shape[1]
        cores.append(r_b[:, start:stop] @ r_a[:, start:stop].T)
        start = stop
    return CoreSpace(q_b=q_b, q_a=q_a, cores=cores)


def top_subspaces(cores: Sequence[torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P: top-`rank` left singular vectors of [K_1 … K_T]; Q: right ones of [K_1; …; K_T].

    Computed from the Gram matrices Σ K_t K_tᵀ and Σ K_tᵀ K_t in float64, whose
    eigenvectors are those singular vectors; this avoids a k×Tk SVD.
    """
    left = sum(k @ k.T for k in cores)
    right = sum(k.T @ k for k in cores)
    assert isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor)
    _, p = torch.linalg.eigh(left)
    _, q = torch.linalg.eigh(right)
    return p[:, -rank:].flip(1), q[:, -rank:].flip(1)


def balanced_factors(left: torch.Tensor, core: torch.Tensor, right: torch.Tensor,
                     rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ``left @ core @ rightᵀ`` as B @ A with B = left·U√Σ and A = √Σ·Vᵀ·rightᵀ.

    `core` is small (float64); its SVD is truncated to `rank` when given, which makes the
    result the best rank-`rank` approximation when `left` and `right` are orthonormal.
    """
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    if rank is not None:
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    b_small = (u * root).to(left.dtype)
    a_small = (root.unsqueeze(1) * vh).to(right.dtype)
    return left @ b_small, a_small @ right.T
