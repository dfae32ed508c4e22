"""Merge methods: one module's input factors in, one module's output factors out.

- ctm   Compress-then-Merge (our reconstruction, DESIGN.md §3): rule on r×r coordinates
        inside shared top-r subspaces of the core space.
- mtc   merge-then-compress: rule on dense m×n deltas, truncated SVD to rank r (what
        PEFT's add_weighted_adapter "svd"/"ties_svd"/... do). Slow by nature: the baseline.
- cat   concatenate the weighted, scaled factors: exact, rank Σ r_t.
- core  Core Space merging: rule on the R×R cores, truncated to rank r.

Every method sees factors already scaled (B_t holds s_t) in float32 on the compute device
and returns (B, A) with delta = B @ A and at most `rank` columns/rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lorafold.errors import UnknownMethod
from lorafold.merge.core_space import balanced_factors, core_space, top_subspaces

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]
ApplyRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MethodInput:
    factors: Factors          # (s_t·B_t, A_t) for the inputs that have this module
    weights: torch.Tensor     # w_t for those inputs, float64, on the device
    rank: int                 # requested output rank (cat ignores it)
    rule: ApplyRule           # the configured rule: (stack, weights) -> merged
    balance: bool = False     # ctm: equalise the inputs' influence on the subspaces


def merge_ctm(inp: MethodInput) -> tuple[torch.Tensor, torch.Tensor]:
    space = core_space(inp.factors)
    weights = inp.weights.to(torch.float64).abs()
    # The subspaces are chosen from the weighted cores: a weight-0 input takes no rank and
    # merging (2X, w) equals merging (X, 2w). `balance` gives each input unit norm instead.
    chosen = []
    for core, w in zip(space.cores, weights, strict=True):
        norm = torch.linalg.matrix_norm(core)
        if inp.balance:
            chosen.append(core / norm if norm > 0 and w > 0 else core * 0)
        else:
            chosen.append(core * w)
    rank = min(inp.rank, space.q_b.shape[1], space.q_a.shape[1])
    p, q = top_subspaces(chosen, rank)
    coords = torch.stack([p.T @ core @ q for core in space.cores])
    merged = inp.rule(coords, inp.weights)
    left = space.q_b @ p.to(space.q_b.dtype)
    right = space.q_a @ q.to(space.q_a.dtype)
    return balanced_factors(left, merged, right)


def merge_core(inp: MethodInput) -> tuple[torch.Tensor, torch.Tensor]:
    space = core_space(inp.factors)
    merged = inp.rule(torch.stack(space.cores), inp.weights)
    return balanced_factors(space.q_b, merged, space.q_a, rank=inp.rank)


def merge_mtc(inp: MethodInput) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = torch.stack([b @ a for b, a in inp.factors])
    merged = inp.rule(deltas, inp.weights.to(deltas.dtype))
    del deltas
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    rank = min(inp.rank, s.shape[0])
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]


def merge_cat(inp: MethodInput) -> tuple[torch.Tensor, torch.Tensor]:
    weights = inp.weights.to(inp.factors[0][0].dtype)
    b = torch.cat([b * w for (b, _), w in zip(inp.factors, weights, strict=True)], dim=1)
    a = torch.cat([a for _, a in inp.factors], dim=0)
    return b, a


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[[MethodInput], tuple[torch.Tensor, torch.Tensor]]
    takes_rank: bool
    takes_rule: bool
    summary: str


METHODS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (
        MethodSpec("ctm", merge_ctm, True, True,
                   "Compress-then-Merge: rule on r×r coordinates in shared subspaces"),
        MethodSpec("mtc", merge_mtc, True, True,
                   "merge-then-compress: rule on dense deltas, truncated SVD (baseline)"),
        MethodSpec("cat", merge_cat, False, False,
                   "concatenate weighted factors: exact, rank = sum of input ranks"),
        MethodSpec("core", merge_core, True, True,
                   "Core Space merging: rule on R×R cores, truncated to rank r"),
    )
}


def resolve_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethod(f"unknown merge method {name!r}; choose one of "
                            f"{', '.join(METHODS)}") from None
