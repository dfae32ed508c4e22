"""Merge methods: one module's input factors in, one module's output factors out.

- ctm   Compress-then-Merge (our reconstruction, DESIGN.md §3): rule on r×r coordinates
        inside shared top-r subspaces of the core space.
- mtc   merge-then-compress: rule on dense m×n deltas, truncated SVD to rank r (what
        PEFT's add_weighted_adapter "svd"/"ties_svd"/... do). Slow by nature: the baseline.
- cat   concatenate the weighted, scaled factors: exact, rank Σ r_t.
- core  Core Space merging: rule on the R×R cores, truncated to rank r.

Every method sees factors already scaled (B_t holds s_t) in float32 on the compute device
and returns (B, A) with delta = B @ A and at most `rank` columns/rows; ctm and core also
return their merge as seen inside the core space, from which the report is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lorafold.errors import UnknownMethod
from lorafold.merge.core_space import core_space, split_core, top_eigenvectors
from lorafold.merge.report import SubspaceView
from lorafold.merge.threads import all_threads

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]
ApplyRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MethodInput:
    factors: Factors          # (s_t·B_t, A_t) for the inputs that have this module
    weights: torch.Tensor     # w_t for those inputs, float64, on the device
    rank: int                 # requested output rank (cat ignores it)
    rule: ApplyRule           # the configured rule: (stack, weights) -> merged
    balance: bool = False     # ctm: equalise the inputs' influence on the subspaces


@dataclass(frozen=True)
class MethodOutput:
    """Merged factors (delta = b @ a) and, where the method has one, its `SubspaceView`."""

    b: torch.Tensor
    a: torch.Tensor
    view: SubspaceView | None = None

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b, self.a


def subspace_weights(inp: MethodInput, norms: torch.Tensor) -> torch.Tensor:
    """c_t: how much input t counts when the shared subspaces are chosen (from c_t·K_t).

    |w_t| by default: a weight-0 input takes no rank, and merging (2X, w) equals merging
    (X, 2w). `balance` gives each input with w_t ≠ 0 unit norm instead (c_t = 1/‖K_t‖).
    """
    weights = inp.weights.to(torch.float64).abs()
    if not inp.balance:
        return weights
    keep = (weights > 0) & (norms > 0)
    return torch.where(keep, 1.0 / torch.where(keep, norms, 1.0), 0.0)


def merge_ctm(inp: MethodInput) -> MethodOutput:
    space = core_space(inp.factors)
    norms = space.core_norms()
    left, right = space.weighted_grams(subspace_weights(inp, norms))
    rank = min(inp.rank, space.left.dim, space.right.dim)
    p, q = top_eigenvectors(left, rank), top_eigenvectors(right, rank)
    coordinates = space.coordinates(p, q)
    merged = inp.rule(coordinates, inp.weights)
    b_small, a_small = split_core(merged)
    return MethodOutput(b=space.left.times(p @ b_small), a=space.right.times_t(a_small @ q.T),
                        view=SubspaceView(merged, coordinates, norms))


def merge_core(inp: MethodInput) -> MethodOutput:
    space = core_space(inp.factors)
    cores = space.cores()
    b_small, a_small = split_core(inp.rule(cores, inp.weights), inp.rank)
    return MethodOutput(b=space.left.times(b_small), a=space.right.times_t(a_small),
                        view=SubspaceView(b_small @ a_small, cores, space.core_norms()))


def merge_mtc(inp: MethodInput) -> MethodOutput:
    with all_threads():                 # every step works on dense m×n matrices
        deltas = torch.stack([b @ a for b, a in inp.factors])
        merged = inp.rule(deltas, inp.weights.to(deltas.dtype))
        del deltas
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    rank = min(inp.rank, s.shape[0])
    root = s[:rank].sqrt()
    return MethodOutput(b=u[:, :rank] * root, a=root.unsqueeze(1) * vh[:rank])


def merge_cat(inp: MethodInput) -> MethodOutput:
    """[c_1 B_1 … c_T B_T] · [A_1; …; A_T] with c_t = λ·w_t: the exact scaled sum.

    cat only takes the linear rule `ta`; applying it to the unit vectors e_t gives each
    input's coefficient, so the weights and the global scale λ reach cat through the same
    rule as every other method (λ is applied once, on the B side).
    """
    units = torch.eye(len(inp.factors), dtype=torch.float64, device=inp.weights.device)
    coefficients = inp.rule(units, inp.weights).to(inp.factors[0][0].dtype)
    b = torch.cat([b * c for (b, _), c in zip(inp.factors, coefficients, strict=True)], dim=1)
    a = torch.cat([a for _, a in inp.factors], dim=0)
    return MethodOutput(b=b, a=a)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[[MethodInput], MethodOutput]
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
