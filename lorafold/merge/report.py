"""Merge report: how much of each input the merged adapter keeps, from factors alone.

Per module and input t (ΔW_t = s_t B_t A_t, ΔW* = B* A*):
- captured energy  ‖Uᵀ ΔW_t V‖²_F / ‖ΔW_t‖²_F, with U, V orthonormal bases of the merged
  adapter's column and row spaces: the share of the input that the output's subspaces can
  still express (1 for an exact merge);
- cosine           ⟨ΔW*, ΔW_t⟩ / (‖ΔW*‖ ‖ΔW_t‖): how aligned the merged delta is with it.

All are computed with r×r products (⟨BA, B'A'⟩ = Σ (BᵀB') ⊙ (AA'ᵀ)), never an m×n matrix.
CtM also reports its shared subspaces per module (`subspace_summary`): the Tucker-2
solver, its sweeps, and the share of the rescaled stack Σ‖X̃_t‖² that P, Q capture, at
the HOSVD start and at the end.

Methods that merge inside orthonormal bases L, R (ctm, core) hand over a `SubspaceView`
instead: with ΔW* = L Y Rᵀ, both numbers only see Lᵀ ΔW_t R, so the report costs a few
k×k products rather than T passes over the m- and n-sized factors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorafold.merge.subspaces import Subspaces


def _inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    return float(((b1.T @ b2).double() * (a1 @ a2.T).double()).sum())


def _basis(matrix: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Orthonormal basis of the column space, dropping numerically zero directions.

    `eps` is the precision the matrix is known to (default: its dtype's).
    """
    if matrix.shape[1] == 0:
        return matrix
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    eps = torch.finfo(matrix.dtype).eps if eps is None else eps
    tol = float(s[0]) * max(matrix.shape) * eps
    return u[:, : int((s > tol).sum())]


def _row(captured: float, inner: float, norm_sq: float, merged_norm: float) -> dict[str, float]:
    """One report entry from ‖Uᵀ ΔW_t V‖², ⟨ΔW*, ΔW_t⟩, ‖ΔW_t‖² and ‖ΔW*‖."""
    if norm_sq <= 0.0:
        return {"energy": 1.0, "cosine": 0.0}
    denom = merged_norm * math.sqrt(norm_sq)
    return {"energy": min(captured / norm_sq, 1.0),
            "cosine": inner / denom if denom > 0 else 0.0}


def module_report(merged: tuple[torch.Tensor, torch.Tensor],
                  inputs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, float]]:
    """One {energy, cosine} entry per input factor pair (scaled B, A)."""
    b_out, a_out = merged
    u = _basis(b_out)
    v = _basis(a_out.T)
    merged_norm = math.sqrt(max(_inner(b_out, a_out, b_out, a_out), 0.0))
    rows = []
    for b, a in inputs:
        norm_sq = _inner(b, a, b, a)
        if norm_sq <= 0.0:
            rows.append(_row(0.0, 0.0, 0.0, merged_norm))
            continue
        captured = float(((u.T @ b).double() @ (a @ v).double()).pow(2).sum())
        rows.append(_row(captured, _inner(b_out, a_out, b, a), norm_sq, merged_norm))
    return rows


@dataclass(frozen=True)
class SubspaceView:
    """A merge inside orthonormal bases L, R: ΔW* = L·merged·Rᵀ, inputs[t] = Lᵀ ΔW_t R."""

    merged: torch.Tensor         # k×l, float64
    inputs: torch.Tensor         # T×k×l, float64
    norms: torch.Tensor          # ‖ΔW_t‖_F (the whole delta, not only its part in L, R)


def subspace_report(view: SubspaceView) -> list[dict[str, float]]:
    """`module_report`'s entries from the k×l matrices of a `SubspaceView`.

    The merged adapter is written in float32, so directions of `merged` below float32
    precision count as zero, as they do when `module_report` reads the written factors.
    """
    eps = torch.finfo(torch.float32).eps
    u = _basis(view.merged, eps)
    v = _basis(view.merged.T, eps)
    captured = (u.T @ view.inputs @ v).pow(2).sum(dim=(1, 2))
    inner = (view.inputs * view.merged).sum(dim=(1, 2))
    merged_norm = float(torch.linalg.matrix_norm(view.merged))
    return [_row(c, i, n * n, merged_norm) for c, i, n in
            zip(captured.tolist(), inner.tolist(), view.norms.tolist(), strict=True)]


def summarize(modules: dict[str, dict[str, dict[str, float]]],
              labels: Sequence[str]) -> dict[str, Any]:
    """Per-input means over the modules each input has; `modules` maps module → label → row."""
    per_input = []
    for label in labels:
        rows = [entries[label] for entries in modules.values() if label in entries]
        n = len(rows)
        per_input.append({
            "input": label,
            "modules": n,
            "mean_energy": sum(r["energy"] for r in rows) / n if n else None,
            "mean_cosine": sum(r["cosine"] for r in rows) / n if n else None,
        })
    return {"inputs": per_input, "modules": modules}


def subspace_summary(found: dict[str, Subspaces]) -> dict[str, Any]:
    """CtM's subspace search per module, and its means over modules."""
    modules = {name: {"sweeps": f.sweeps, "energy": f.energy, "start_energy": f.start_energy}
               for name, f in found.items()}
    n = len(modules)
    return {
        "mode": next(iter(found.values())).mode,
        "mean_energy": sum(m["energy"] for m in modules.values()) / n,
        "mean_start_energy": sum(m["start_energy"] for m in modules.values()) / n,
        "max_sweeps": max(m["sweeps"] for m in modules.values()),
        "modules": modules,
    }
