"""Merge report: how much of each input the merged adapter keeps, from factors alone.

Per module and input t (ΔW_t = s_t B_t A_t, ΔW* = B* A*):
- captured energy  ‖Uᵀ ΔW_t V‖²_F / ‖ΔW_t‖²_F, with U, V orthonormal bases of the merged
  adapter's column and row spaces: the share of the input that the output's subspaces can
  still express (1 for an exact merge);
- cosine           ⟨ΔW*, ΔW_t⟩ / (‖ΔW*‖ ‖ΔW_t‖): how aligned the merged delta is with it.

All are computed with r×r products (⟨BA, B'A'⟩ = Σ (BᵀB') ⊙ (AA'ᵀ)), never an m×n matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def _inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    return float(((b1.T @ b2).double() * (a1 @ a2.T).double()).sum())


def _basis(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space, dropping numerically zero directions."""
    if matrix.shape[1] == 0:
        return matrix
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    tol = float(s[0]) * max(matrix.shape) * torch.finfo(matrix.dtype).eps
    return u[:, : int((s > tol).sum())]


def module_report(merged: tuple[torch.Tensor, torch.Tensor],
                  inputs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, float]]:
    """One {energy, cosine} entry per input factor pair (scaled B, A)."""
    b_out, a_out = merged
    u = _basis(b_out)
    v = _basis(a_out.T)
    merged_norm = math.sqrt(max(_inner(b_out, a_out, b_out, a_out), 0.0))
    rows = []
    for b, a in inputs:
        norm_sq = max(_inner(b, a, b, a), 0.0)
        if norm_sq == 0.0:
            rows.append({"energy": 1.0, "cosine": 0.0})
            continue
        captured = float(((u.T @ b).double() @ (a @ v).double()).pow(2).sum())
        denom = merged_norm * math.sqrt(norm_sq)
        cosine = _inner(b_out, a_out, b, a) / denom if denom > 0 else 0.0
        rows.append({"energy": min(captured / norm_sq, 1.0), "cosine": cosine})
    return rows


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
