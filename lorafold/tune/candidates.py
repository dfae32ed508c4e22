"""A merge's reusable parts, computed once, and the candidate merges built from them.

Between candidates of a search only λ, β, the rule's knobs (and for learned weights the
weights) change. So per module the factors are read once, and for ctm and core the core
space is taken once; ctm's shared subspaces, coordinates and the bases Q_B P, Qᵀ Q_Aᵀ once
per β; the merged r×r coordinates once per (β, density, drop). λ is the last factor of every
rule (lorafold.merge.rules), so a candidate differing only in λ costs a scaling of B.

The candidates follow the merge engine step for step (lorafold.merge.methods.merge_ctm /
merge_core with the executor's per-module generator); the tests hold them equal to what
`merge_adapters` writes for the same parameters. mtc and cat have nothing to share and are
merged by the engine's own method function for each candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from lorafold.adapters.reader import LoraAdapter, ModuleSpec
from lorafold.merge.core_space import CoreSpace, core_space, split_core
from lorafold.merge.executor import module_generator
from lorafold.merge.methods import MethodInput, ctm_subspaces
from lorafold.merge.plan import MergePlan, ModulePlan
from lorafold.merge.rules import RuleParams

Factors = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LinearView:
    """One module's merge as x ↦ B_out (Σ_t w_t C_t) A_out x for fixed subspaces.

    ctm: B_out = Q_B P (m×r), A_out = Qᵀ Q_Aᵀ (r×n), C_t = Pᵀ K_t Q; cat: the whole core
    space (B_out = Q_B, A_out = Q_Aᵀ, C_t = K_t). `inputs` are the plan's input indices.
    """

    spec: ModuleSpec
    b_out: torch.Tensor          # float32
    a_out: torch.Tensor          # float32
    coordinates: torch.Tensor    # T_module×r×r, float32
    inputs: tuple[int, ...]


@dataclass(frozen=True)
class _Subspaces:
    p: torch.Tensor
    q: torch.Tensor
    view: LinearView


@dataclass
class _Module:
    plan: ModulePlan
    factors: list[Factors]
    space: CoreSpace | None
    subspaces: dict[tuple[object, ...], _Subspaces] = field(default_factory=dict)
    core_bases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


ApplyRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KEPT_MERGES = 4   # merged candidates kept (λ-only changes reuse the latest)


class CandidateSpace:
    """Candidate merges of one plan on one device; see the module docstring."""

    def __init__(self, plan: MergePlan, adapters: Sequence[LoraAdapter],
                 device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self._modules: list[_Module] = []
        self._merged: dict[tuple[object, ...], dict[str, Factors]] = {}
        shared = plan.method.name in ("ctm", "core", "cat")
        for module in plan.modules:
            factors = []
            for index in module.inputs:
                loaded = adapters[index].load(module.name, device=device)
                factors.append((loaded.B.to(torch.float32) * loaded.scale,
                                loaded.A.to(torch.float32)))
            self._modules.append(_Module(module, factors,
                                         core_space(factors) if shared else None))

    def _weights(self, module: _Module, weights: Sequence[float]) -> torch.Tensor:
        return torch.tensor([weights[i] for i in module.plan.inputs], dtype=torch.float64,
                            device=self.device)

    def _rule(self, module: _Module, params: RuleParams) -> ApplyRule:
        generator = module_generator(self.plan.request.seed, module.plan.name)
        spec = self.plan.rule

        def rule(stack: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return spec.fn(stack, w, params, generator)
        return rule

    def _subspaces(self, module: _Module, beta: float, weights: Sequence[float]) -> _Subspaces:
        """ctm's shared subspaces for β at `weights` (which the rescaling reads), or for cat
        the whole core space, with the view they give."""
        key = (beta, tuple(weights))
        if key not in module.subspaces:
            space = module.space
            assert space is not None
            if self.plan.method.name == "cat":
                p = torch.eye(space.left.dim, dtype=torch.float64, device=self.device)
                q = torch.eye(space.right.dim, dtype=torch.float64, device=self.device)
            else:
                found = ctm_subspaces(space, self._weights(module, weights), self.plan.rank,
                                      beta, self.plan.request.ctm_subspace)
                p, q = found.p, found.q
            view = LinearView(module.plan.spec, space.left.times(p), space.right.times_t(q.T),
                              space.coordinates(p, q).float(), module.plan.inputs)
            module.subspaces[key] = _Subspaces(p, q, view)
        return module.subspaces[key]

    def linear_views(self, beta: float, weights: Sequence[float]) -> list[LinearView]:
        """Every module's `LinearView` with the subspaces fixed at (β, `weights`)."""
        return [self._subspaces(m, beta, weights).view for m in self._modules]

    def _merge_module(self, module: _Module, beta: float, weights: Sequence[float],
                      params: RuleParams) -> Factors:
        rule, method = self._rule(module, params), self.plan.method.name
        flat = self.plan.rule.flat_spectrum
        w = self._weights(module, weights)
        space = module.space
        if method == "ctm":
            assert space is not None
            found = self._subspaces(module, beta, weights)
            b_small, a_small = split_core(rule(space.coordinates(found.p, found.q), w),
                                          flat=flat)
            return found.view.b_out @ b_small.float(), a_small.float() @ found.view.a_out
        if method == "core":
            assert space is not None
            if module.core_bases is None:
                u_b, u_a = space.svd_rotations()
                module.core_bases = (u_b, u_a, space.coordinates(u_b, u_a))
            u_b, u_a, cores = module.core_bases
            b_small, a_small = split_core(rule(cores, w), self.plan.rank, flat=flat)
            return space.left.times(u_b @ b_small), space.right.times_t(a_small @ u_a.T)
        out = self.plan.method.fn(MethodInput(
            factors=module.factors, weights=w, rank=self.plan.rank, rule=rule,
            flat_spectrum=flat, beta=beta, subspace=self.plan.request.ctm_subspace))
        return out.b, out.a

    def release(self) -> None:
        """Drop the inputs' factors, core spaces and cached merges, keeping nothing but what
        `linear_views` already returned: learned weights then hold one adapter's worth."""
        for module in self._modules:
            module.factors.clear()
            module.space = None
            module.subspaces.clear()
            module.core_bases = None
        self._merged.clear()

    def merged(self, point: Mapping[str, float],
               weights: Sequence[float] | None = None) -> dict[str, Factors]:
        """Every module's merged (B, A) at `point` (lambda, beta, density, drop; missing
        ones from the plan's request) and `weights` (default the plan's)."""
        request = self.plan.request
        chosen = tuple(float(w) for w in (self.plan.weights if weights is None else weights))
        beta = float(point.get("beta", request.ctm_beta))
        params = replace(self.plan.rule_params, scale=1.0,
                         density=float(point.get("density", self.plan.rule_params.density)),
                         drop=float(point.get("drop", self.plan.rule_params.drop)))
        key = (beta, params.density, params.drop, chosen)
        if key not in self._merged:
            while len(self._merged) >= KEPT_MERGES:
                self._merged.pop(next(iter(self._merged)))
            self._merged[key] = {m.plan.name: self._merge_module(m, beta, chosen, params)
                                 for m in self._modules}
        scale = float(point.get("lambda", request.scale))
        return {name: (b * scale, a) for name, (b, a) in self._merged[key].items()}
