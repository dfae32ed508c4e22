"""Merge rules: combine a stack of same-shape tensors X_t with weights w_t into one.

The same rules serve every method: CtM applies them to r×r coordinates, `core` to R×R
cores and `mtc` to dense m×n deltas. The entry-wise rules are configurations of one
generalised rule (as mergekit's generalized task arithmetic, and the CtM authors' code):

    drop (DARE)  → weight → trim (TIES) → elect sign + disjoint mean (TIES) | sum

- ta         weight → sum                                      (task arithmetic)
- ties       weight → trim to top-`density` by |x| → elect → disjoint mean
- dare       drop with probability `drop`, rescale 1/(1−drop) → weight → sum
- dare_ties  dare's drop → ties' trim, election and disjoint mean
- iso        Σ w_t X_t with a flat singular spectrum (Iso-C): its non-zero singular values
             replaced by their mean. Methods that truncate to rank r (mtc, core) flatten
             *after* truncating, so iso there is "truncate, then flatten", the Iso-C
             baseline of the CtM paper; see `RuleSpec.flat_spectrum`.
- tsv        Task Singular Vectors (TSV-Merge, arXiv 2412.00081): each w_t X_t keeps its top
             ⌊k/T⌋ singular directions, the kept left and right directions of all inputs are
             orthogonalised together (polar factors), and their singular values reused.

Every rule ends with a global scale λ (`scale`, default 1). Sign election uses the summed
weighted values ("total" in PEFT's merge_utils); an entry whose sum is exactly zero takes
the majority of the elected signs, as in the TIES authors' code. The disjoint mean divides
by the number of agreeing inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafold.errors import InvalidRequest, UnknownRule
from lorafold.merge.options import DEFAULT_DENSITY, DEFAULT_DROP


@dataclass(frozen=True)
class RuleParams:
    density: float = DEFAULT_DENSITY     # ties trim: fraction of entries kept per input
    drop: float = DEFAULT_DROP           # dare: probability that an entry is dropped
    scale: float = 1.0                   # global λ


RuleFn = Callable[[torch.Tensor, torch.Tensor, RuleParams, torch.Generator | None], torch.Tensor]


def _weighted(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (stack.dim() - 1)
    return stack * weights.to(stack.dtype).reshape(shape)


def trim_by_magnitude(stack: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ceil(density·numel) largest-|x| entries of each X_t, zero the rest."""
    if density >= 1.0:
        return stack
    flat = stack.reshape(stack.shape[0], -1)
    k = max(1, math.ceil(density * flat.shape[1]))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep.scatter_(1, flat.abs().topk(k, dim=1).indices, True)
    return (flat * keep).reshape(stack.shape)


def drop_at_random(stack: torch.Tensor, drop: float,
                   generator: torch.Generator | None) -> torch.Tensor:
    """DARE: drop each entry with probability `drop` and rescale the rest by 1/(1−drop).

    The mask is drawn on the CPU from a seeded generator so that a seed gives the same
    merge on any device.
    """
    if drop <= 0.0:
        return stack
    keep = torch.rand(stack.shape, generator=generator, dtype=torch.float32) >= drop
    return stack * keep.to(stack.device, stack.dtype) / (1.0 - drop)


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """Per entry, the sign of the summed weighted values; exact zeros take the majority."""
    sign = torch.sign(weighted.sum(dim=0))
    majority = torch.sign(sign.sum())
    return torch.where(sign == 0, majority, sign)


def disjoint_mean(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean over inputs of the entries that are non-zero and agree with the elected sign."""
    agree = (torch.sign(weighted) == sign.unsqueeze(0)) & (weighted != 0)
    total = (weighted * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1).to(weighted.dtype)


def numerical_rank(s: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """How many singular values `s` (descending) of a matrix of `shape` are non-zero."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * max(shape) * torch.finfo(dtype).eps
    return int((s > tol).sum())


def flatten_spectrum(s: torch.Tensor, rank: int) -> torch.Tensor:
    """The first `rank` singular values replaced by their mean, the rest zero (Iso-C)."""
    flat = torch.zeros_like(s)
    if rank > 0:
        flat[:rank] = s[:rank].mean()
    return flat


def isotropic(matrix: torch.Tensor) -> torch.Tensor:
    """Replace the non-zero singular values of a matrix by their mean (Iso-C).

    The mean is over the numerically non-zero spectrum, so a low-rank matrix keeps its rank
    and the result does not depend on zero padding of the representation.
    """
    if matrix.dim() != 2:
        raise InvalidRequest("rule iso needs 2-D tensors", code="invalid_rule_input")
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    rank = numerical_rank(s, tuple(matrix.shape), matrix.dtype)
    if rank == 0:
        return matrix
    return ((u[:, :rank] * s[:rank].mean()) @ vh[:rank]).to(matrix.dtype)


def polar_factor(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor U Vᵀ of x = U Σ Vᵀ: the nearest matrix with orthonormal
    columns (or rows, when x is wide)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def task_singular_vectors(weighted: torch.Tensor) -> torch.Tensor:
    """TSV-Merge of a stack of T weighted p×q matrices.

    Each input keeps its top max(1, ⌊min(p, q)/T⌋) singular triples (only numerically
    non-zero ones: directions of a zero singular value are arbitrary); the kept left vectors
    of all inputs are replaced by the polar factor of their concatenation (likewise the
    right ones), which removes the interference between inputs' directions, and the
    merged matrix is U⊥ diag(σ) V⊥ᵀ.
    """
    if weighted.dim() != 3:
        raise InvalidRequest("rule tsv needs 2-D tensors", code="invalid_rule_input")
    t, p, q = weighted.shape
    keep = max(1, min(p, q) // t)
    u, s, vh = torch.linalg.svd(weighted.double(), full_matrices=False)
    lefts, rights, sigmas = [], [], []
    for i in range(t):
        kept = min(keep, numerical_rank(s[i], (p, q), weighted.dtype))
        lefts.append(u[i, :, :kept])
        rights.append(vh[i, :kept].T)
        sigmas.append(s[i, :kept])
    sigma = torch.cat(sigmas)
    if sigma.numel() == 0:
        return torch.zeros_like(weighted[0])
    left, right = polar_factor(torch.cat(lefts, dim=1)), polar_factor(torch.cat(rights, dim=1))
    return ((left * sigma) @ right.T).to(weighted.dtype)


@dataclass(frozen=True)
class GeneralizedRule:
    """drop → weight → trim → (elect + disjoint mean | sum): ta, ties, dare, dare_ties."""

    drop: bool = False
    trim: bool = False
    elect: bool = False

    def __call__(self, stack: torch.Tensor, weights: torch.Tensor, params: RuleParams,
                 generator: torch.Generator | None) -> torch.Tensor:
        if self.drop:
            stack = drop_at_random(stack, params.drop, generator)
        weighted = _weighted(stack, weights)
        if self.trim:
            weighted = trim_by_magnitude(weighted, params.density)
        if self.elect:
            return disjoint_mean(weighted, elect_sign(weighted)) * params.scale
        return weighted.sum(dim=0) * params.scale


def rule_tsv(stack: torch.Tensor, weights: torch.Tensor, params: RuleParams,
             generator: torch.Generator | None) -> torch.Tensor:
    return task_singular_vectors(_weighted(stack, weights)) * params.scale


@dataclass(frozen=True)
class RuleSpec:
    name: str
    fn: RuleFn                   # the combination; for iso the plain weighted sum
    uses_density: bool
    uses_drop: bool
    random: bool
    summary: str
    flat_spectrum: bool = False  # after the combination (and any truncation): flatten


RULES: dict[str, RuleSpec] = {
    spec.name: spec for spec in (
        RuleSpec("ta", GeneralizedRule(), False, False, False, "task arithmetic: weighted sum"),
        RuleSpec("ties", GeneralizedRule(trim=True, elect=True), True, False, False,
                 "trim to top-density by magnitude, elect sign, mean of agreeing entries"),
        RuleSpec("dare", GeneralizedRule(drop=True), False, True, True,
                 "drop entries with probability drop, rescale, weighted sum"),
        RuleSpec("dare_ties", GeneralizedRule(drop=True, trim=True, elect=True), True, True,
                 True, "dare's random drop, then ties' trim, election and disjoint mean"),
        RuleSpec("iso", GeneralizedRule(), False, False, False,
                 "weighted sum with a flat (isotropic) singular spectrum", flat_spectrum=True),
        RuleSpec("tsv", rule_tsv, False, False, False,
                 "task singular vectors: each input's top directions, orthogonalised"),
    )
}


def apply_rule(spec: RuleSpec, stack: torch.Tensor, weights: torch.Tensor, params: RuleParams,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The whole rule with no rank limit (iso flattens the whole spectrum)."""
    merged = spec.fn(stack, weights, params, generator)
    return isotropic(merged) if spec.flat_spectrum else merged


def resolve_rule(name: str) -> RuleSpec:
    try:
        return RULES[name]
    except KeyError:
        raise UnknownRule(f"unknown merge rule {name!r}; choose one of "
                          f"{', '.join(RULES)}") from None


def check_rule_params(spec: RuleSpec, density: float | None, drop: float | None,
                      scale: float) -> RuleParams:
    """Validate rule parameters before any tensor is loaded."""
    if density is not None and not spec.uses_density:
        hint = " (dare's parameter is drop, the drop rate)" if spec.uses_drop else ""
        raise InvalidRequest(f"rule {spec.name!r} takes no density{hint}",
                             code="invalid_parameter")
    if density is not None and not (0.0 < density <= 1.0):
        raise InvalidRequest(f"density must be in (0, 1], got {density}",
                             code="invalid_parameter")
    if drop is not None and not spec.uses_drop:
        raise InvalidRequest(f"rule {spec.name!r} takes no drop", code="invalid_parameter")
    if drop is not None and not (0.0 <= drop < 1.0):
        raise InvalidRequest(f"drop must be in [0, 1), got {drop}", code="invalid_parameter")
    if not math.isfinite(scale):
        raise InvalidRequest("scale must be a finite number", code="invalid_parameter")
    return RuleParams(density=DEFAULT_DENSITY if density is None else density,
                      drop=DEFAULT_DROP if drop is None else drop, scale=scale)
