"""Merge methods: one module's input factors in, one module's output factors out.

- ctm   Compress-then-Merge (DESIGN.md §3, after its authors' code): rule on r×r
        coordinates inside shared rank-r Tucker-2 subspaces of the β-rescaled cores.
- mtc   merge-then-compress: rule on dense m×n deltas, truncated SVD to rank r (what
        PEFT's add_weighted_adapter "svd"/"ties_svd"/... do). Slow by nature: the baseline.
- cat   concatenate the weighted, scaled factors: exact, rank Σ r_t.
- core  Core Space merging (arXiv 2509.17786): rule on the R×R cores in the SVD bases of
        the stacked factors, truncated to rank r. With ta or iso it equals mtc exactly (the
        dense sum is Q_B (Σ w_t K_t) Q_Aᵀ), at CtM's cost.

A rule with a flat spectrum (iso) is flattened after the truncation to rank r: mtc and core
give "truncate, then flatten", and ctm, whose merge already has rank r, "flatten".

Every method sees factors already scaled (B_t holds s_t) in float32 on the compute device
and returns (B, A) with delta = B @ A and at most `rank` columns/rows; ctm and core also
return their merge as seen inside the core space, from which the report is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lorafold.errors import UnknownMethod
from lorafold.merge.core_space import CoreSpace, core_space, split_core
from lorafold.merge.options import DEFAULT_BETA, DEFAULT_SUBSPACE
from lorafold.merge.report import SubspaceView
from lorafold.merge.rules import flatten_spectrum, numerical_rank
from lorafold.merge.subspaces import Subspaces, shared_subspaces
from lorafold.merge.threads import all_threads

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]
ApplyRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MethodInput:
    factors: Factors          # (s_t·B_t, A_t) for the inputs that have this module
    weights: torch.Tensor     # w_t for those inputs, float64, on the device
    rank: int                 # requested output rank (cat ignores it)
    rule: ApplyRule           # the configured rule's combination: (stack, weights) -> merged
    flat_spectrum: bool = False   # the rule flattens the spectrum after truncation (iso)
    beta: float = DEFAULT_BETA    # ctm: 1 = inputs as they are, 0 = all at the mean norm
    subspace: str = DEFAULT_SUBSPACE   # ctm: "hooi" or "hosvd"


@dataclass(frozen=True)
class MethodOutput:
    """Merged factors (delta = b @ a) and, where the method has one, its `SubspaceView`."""

    b: torch.Tensor
    a: torch.Tensor
    view: SubspaceView | None = None
    subspaces: Subspaces | None = None

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b, self.a


def rescaled_weights(weights: torch.Tensor, norms: torch.Tensor, beta: float) -> torch.Tensor:
    """c_t with ‖c_t K_t‖ = λ_t = β n_t + (1−β)·mean_s n_s, where n_t = |w_t|·‖K_t‖.

    The CtM authors' rescaling of the stack before the subspaces are chosen: β = 1 keeps
    each input's own norm (|w_t| counts, a weight-0 input takes no rank, and merging
    (2X, w) equals merging (X, 2w)); β = 0 puts every input at the mean norm. Inputs with
    n_t = 0 stay at zero and are left out of the mean.
    """
    scaled = weights.to(torch.float64).abs() * norms
    active = scaled > 0
    if not bool(active.any()):
        return scaled
    target = beta * scaled + (1.0 - beta) * scaled[active].mean()
    return torch.where(active, target / torch.where(active, norms, 1.0), 0.0)


def ctm_subspaces(space: CoreSpace, weights: torch.Tensor, rank: int, beta: float,
                  mode: str, norms: torch.Tensor | None = None) -> Subspaces:
    """CtM's shared rank-r subspaces of the β-rescaled cores: what every ctm merge of these
    inputs at this β and these weights' magnitudes shares (tuned merges cache it)."""
    norms = space.core_norms() if norms is None else norms
    rank = min(rank, space.left.dim, space.right.dim)
    return shared_subspaces(space.factor_stack(rescaled_weights(weights, norms, beta)), rank,
                            mode)


def merge_ctm(inp: MethodInput) -> MethodOutput:
    space = core_space(inp.factors)
    norms = space.core_norms()
    found = ctm_subspaces(space, inp.weights, inp.rank, inp.beta, inp.subspace, norms)
    coordinates = space.coordinates(found.p, found.q)
    merged = inp.rule(coordinates, inp.weights)
    b_small, a_small = split_core(merged, flat=inp.flat_spectrum)
    return MethodOutput(b=space.left.times(found.p @ b_small),
                        a=space.right.times_t(a_small @ found.q.T),
                        view=SubspaceView(b_small @ a_small, coordinates, norms),
                        subspaces=found)


def merge_core(inp: MethodInput) -> MethodOutput:
    space = core_space(inp.factors)
    u_b, u_a = space.svd_rotations()
    cores = space.coordinates(u_b, u_a)
    b_small, a_small = split_core(inp.rule(cores, inp.weights), inp.rank,
                                  flat=inp.flat_spectrum)
    return MethodOutput(b=space.left.times(u_b @ b_small), a=space.right.times_t(a_small @ u_a.T),
                        view=SubspaceView(b_small @ a_small, cores, space.core_norms()))


def merge_mtc(inp: MethodInput) -> MethodOutput:
    with all_threads():                 # every step works on dense m×n matrices
        deltas = torch.stack([b @ a for b, a in inp.factors])
        merged = inp.rule(deltas, inp.weights.to(deltas.dtype))
        del deltas
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    rank = min(inp.rank, s.shape[0])
    s = s[:rank]
    if inp.flat_spectrum:
        s = flatten_spectrum(s, numerical_rank(s, tuple(merged.shape), merged.dtype))
    root = s.sqrt()
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
    dense: bool = False       # works on m×n matrices: its memory is a module's dense stack


METHODS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (
        MethodSpec("ctm", merge_ctm, True, True,
                   "Compress-then-Merge: rule on r×r coordinates in shared subspaces"),
        MethodSpec("mtc", merge_mtc, True, True,
                   "merge-then-compress: rule on dense deltas, truncated SVD (baseline)",
                   dense=True),
        MethodSpec("cat", merge_cat, False, False,
                   "concatenate weighted factors: exact, rank = sum of input ranks"),
        MethodSpec("core", merge_core, True, True,
                   "Core Space merging: rule on R×R cores (SVD bases), truncated to rank r"),
    )
}


def resolve_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethod(f"unknown merge method {name!r}; choose one of "
                            f"{', '.join(METHODS)}") from None
