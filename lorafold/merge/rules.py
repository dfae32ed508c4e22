"""Merge rules: combine a stack of same-shape tensors X_t with weights w_t into one.

The same rules serve every method: CtM applies them to r×r coordinates, `core` to R×R
cores and `mtc` to dense m×n deltas. Each rule is a composition of small steps:

- ta         Σ w_t X_t                                  (task arithmetic)
- ties       trim to top-density by |x| → weight → elect sign → mean of agreeing entries
- dare       random drop (keep prob. density, rescale 1/density) → Σ w_t X_t
- dare_ties  dare's drop → ties' election and disjoint mean
- iso        Σ w_t X_t with its non-zero singular values replaced by their mean (Iso-C)

Every rule ends with a global scale λ (`scale`, default 1). Sign election uses the summed
weighted values ("total" in PEFT's merge_utils); the disjoint mean divides by the number of
agreeing inputs, as PEFT and the TIES paper do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafold.errors import InvalidRequest, UnknownRule

DEFAULT_DENSITY = 0.5


@dataclass(frozen=True)
class RuleParams:
    density: float = DEFAULT_DENSITY
    scale: float = 1.0


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


def drop_at_random(stack: torch.Tensor, density: float,
                   generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and rescale by 1/density.

    The mask is drawn on the CPU from a seeded generator so that a seed gives the same
    merge on any device.
    """
    if density >= 1.0:
        return stack
    keep = torch.rand(stack.shape, generator=generator, dtype=torch.float32) < density
    return stack * keep.to(stack.device, stack.dtype) / density


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """Per entry, the sign of the summed weighted values (ties' 'total' election)."""
    return torch.sign(weighted.sum(dim=0))


def disjoint_mean(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean over inputs of the entries that are non-zero and agree with the elected sign."""
    agree = (torch.sign(weighted) == sign.unsqueeze(0)) & (weighted != 0)
    total = (weighted * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1).to(weighted.dtype)


def isotropic(matrix: torch.Tensor) -> torch.Tensor:
    """Replace the non-zero singular values of a matrix by their mean (Iso-C).

    The mean is over the numerically non-zero spectrum, so a low-rank matrix keeps its rank
    and the result does not depend on zero padding of the representation.
    """
    if matrix.dim() != 2:
        raise InvalidRequest("rule iso needs 2-D tensors", code="invalid_rule_input")
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return matrix
    tol = float(s[0]) * max(matrix.shape) * torch.finfo(matrix.dtype).eps
    rank = int((s > tol).sum())
    mean = s[:rank].mean()
    return ((u[:, :rank] * mean) @ vh[:rank]).to(matrix.dtype)


def rule_ta(stack: torch.Tensor, weights: torch.Tensor, params: RuleParams,
            generator: torch.Generator | None) -> torch.Tensor:
    return _weighted(stack, weights).sum(dim=0) * params.scale


def rule_ties(stack: torch.Tensor, weights: torch.Tensor, params: RuleParams,
              generator: torch.Generator | None) -> torch.Tensor:
    weighted = _weighted(trim_by_magnitude(stack, params.density), weights)
    return disjoint_mean(weighted, elect_sign(weighted)) * params.scale


def rule_dare(stack: torch.Tensor, weights: torch.Tensor, params: RuleParams,
              generator: torch.Generator | None) -> torch.Tensor:
    dropped = drop_at_random(stack, params.density, generator)
    return _weighted(dropped, weights).sum(dim=0) * params.scale


def rule_dare_ties(stack: torch.Tensor, weights: torch.Tensor, params: RuleParams,
                   generator: torch.Generator | None) -> torch.Tensor:
    weighted = _weighted(drop_at_random(stack, params.density, generator), weights)
    return disjoint_mean(weighted, elect_sign(weighted)) * params.scale


def rule_iso(stack: torch.Tensor, weights: torch.Tensor, params: RuleParams,
             generator: torch.Generator | None) -> torch.Tensor:
    return isotropic(_weighted(stack, weights).sum(dim=0)) * params.scale


@dataclass(frozen=True)
class RuleSpec:
    name: str
    fn: RuleFn
    uses_density: bool
    random: bool
    summary: str


RULES: dict[str, RuleSpec] = {
    spec.name: spec for spec in (
        RuleSpec("ta", rule_ta, False, False, "task arithmetic: weighted sum"),
        RuleSpec("ties", rule_ties, True, False,
                 "trim to top-density by magnitude, elect sign, mean of agreeing entries"),
        RuleSpec("dare", rule_dare, True, True,
                 "random drop with keep probability density, rescale, weighted sum"),
        RuleSpec("dare_ties", rule_dare_ties, True, True, "dare's drop, then ties' election"),
        RuleSpec("iso", rule_iso, False, False,
                 "weighted sum with a flat (isotropic) singular spectrum"),
    )
}


def resolve_rule(name: str) -> RuleSpec:
    try:
        return RULES[name]
    except KeyError:
        raise UnknownRule(f"unknown merge rule {name!r}; choose one of "
                          f"{', '.join(RULES)}") from None


def check_rule_params(spec: RuleSpec, density: float | None, scale: float) -> RuleParams:
    """Validate rule parameters before any tensor is loaded."""
    if density is not None and not spec.uses_density:
        raise InvalidRequest(f"rule {spec.name!r} takes no density", code="invalid_parameter")
    if density is not None and not (0.0 < density <= 1.0):
        raise InvalidRequest(f"density must be in (0, 1], got {density}",
                             code="invalid_parameter")
    if not math.isfinite(scale):
        raise InvalidRequest("scale must be a finite number", code="invalid_parameter")
    return RuleParams(density=DEFAULT_DENSITY if density is None else density, scale=scale)
