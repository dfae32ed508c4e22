"""Turn a merge request and opened adapters into a plan, before any tensor is read.

A plan lists, per output module, which inputs contribute (an input without the module
contributes a zero delta and is simply left out there), with every compatibility check
done up front: a request that would fail on module 200 fails before module 1 is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lorafold.adapters.reader import LoraAdapter, ModuleSpec
from lorafold.adapters.tensor_file import torch_dtype
from lorafold.errors import IncompatibleAdapters, InvalidRequest
from lorafold.merge.conform import check_rank, check_target, serving_dtype
from lorafold.merge.methods import METHODS, MethodSpec, resolve_method
from lorafold.merge.options import (
    DEFAULT_BETA,
    DEFAULT_DENSITY,
    DEFAULT_DROP,
    DEFAULT_METHOD,
    DEFAULT_RULE,
    DEFAULT_SUBSPACE,
    OUTPUT_DTYPES,
    SUBSPACE_MODES,
)
from lorafold.merge.rules import RULES, RuleParams, RuleSpec, check_rule_params, resolve_rule

MAX_RANK = 4096


@dataclass(frozen=True)
class MergeRequest:
    """What to merge and how. Weights default to 1 for every input; the rule to
    `rule_name`; `beta` and `subspace` (ctm only) to DEFAULT_BETA and DEFAULT_SUBSPACE."""

    method: str = DEFAULT_METHOD
    rule: str | None = None
    rank: int | None = None
    weights: tuple[float, ...] | None = None
    density: float | None = None
    drop: float | None = None
    scale: float = 1.0
    seed: int = 0
    beta: float | None = None
    subspace: str | None = None
    force: bool = False
    dtype: str | None = None
    min_energy: float | None = None     # rank "auto": the smallest rank keeping this share
    target: str | None = None           # a serving engine to conform to (merge.conform)
    base_model_name: str | None = None  # written as the output's base_model_name_or_path

    @property
    def rule_name(self) -> str:
        """The rule asked for, or the default: DEFAULT_RULE, and for the exact methods that
        take no rule (cat) the plain weighted sum."""
        if self.rule is not None:
            return self.rule
        method = METHODS.get(self.method)
        return "ta" if method is not None and not method.takes_rule else DEFAULT_RULE

    @property
    def ctm_beta(self) -> float:
        return DEFAULT_BETA if self.beta is None else self.beta

    @property
    def ctm_subspace(self) -> str:
        return DEFAULT_SUBSPACE if self.subspace is None else self.subspace

    def parameters(self) -> dict[str, object]:
        """The request as recorded in lineage (enough to redo the merge exactly). Defaults
        that shape the result (density, drop, ctm's β and subspace) are written out, so a
        later change of default cannot change a re-merge."""
        ctm = self.method == "ctm"
        rule = RULES.get(self.rule_name)
        uses_density, uses_drop = (rule.uses_density, rule.uses_drop) if rule else (False, False)
        density = DEFAULT_DENSITY if self.density is None and uses_density else self.density
        drop = DEFAULT_DROP if self.drop is None and uses_drop else self.drop
        return {"method": self.method, "rule": self.rule_name, "rank": self.rank,
                "density": density, "drop": drop, "scale": self.scale,
                "seed": self.seed, "beta": self.ctm_beta if ctm else None,
                "subspace": self.ctm_subspace if ctm else None, "dtype": self.dtype,
                "min_energy": self.min_energy, "target": self.target,
                "base_model_name": self.base_model_name}


@dataclass(frozen=True)
class ModulePlan:
    name: str
    spec: ModuleSpec                 # shape template for writing the output
    inputs: tuple[int, ...]          # indices of the adapters that have this module


@dataclass(frozen=True)
class MergePlan:
    request: MergeRequest
    method: MethodSpec
    rule: RuleSpec
    rule_params: RuleParams
    weights: tuple[float, ...]
    rank: int
    dtype: torch.dtype
    labels: tuple[str, ...]
    modules: list[ModulePlan] = field(default_factory=list)


def check_request(request: MergeRequest, n_inputs: int) -> tuple[MethodSpec, RuleSpec, RuleParams,
                                                                  tuple[float, ...]]:
    """Everything about a request that can be checked without the adapters' contents."""
    method = resolve_method(request.method)
    rule = resolve_rule(request.rule_name)
    if n_inputs < 1:
        raise InvalidRequest("a merge needs at least one input adapter", code="no_inputs")
    weights = request.weights if request.weights is not None else (1.0,) * n_inputs
    if len(weights) != n_inputs:
        raise InvalidRequest(f"{len(weights)} weights for {n_inputs} adapters",
                             code="weights_mismatch")
    if not all(math.isfinite(w) for w in weights):
        raise InvalidRequest("weights must be finite numbers", code="invalid_parameter")
    if request.min_energy is not None:
        _check_auto_rank(method, request)
    elif method.takes_rank:
        if request.rank is None:
            raise InvalidRequest(f"method {method.name!r} needs an output rank",
                                 code="rank_required")
        if not (1 <= request.rank <= MAX_RANK):
            raise InvalidRequest(f"rank must be between 1 and {MAX_RANK}, got {request.rank}",
                                 code="invalid_parameter")
    if not method.takes_rule and request.rule_name != "ta":
        raise InvalidRequest(f"method {method.name!r} is exact and takes no rule (it always "
                             "sums the weighted deltas)", code="invalid_parameter")
    _check_ctm_options(method, request)
    if request.dtype is not None and request.dtype not in OUTPUT_DTYPES:
        raise InvalidRequest(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}",
                             code="invalid_parameter")
    check_target(request.target, request.base_model_name)
    if request.rank is not None:
        check_rank(request.target, request.rank)
    params = check_rule_params(rule, request.density, request.drop, request.scale)
    return method, rule, params, tuple(float(w) for w in weights)


def _check_auto_rank(method: MethodSpec, request: MergeRequest) -> None:
    """rank "auto" picks the rank from CtM's captured energies: ctm only, no rank given."""
    energy = request.min_energy
    assert energy is not None
    if method.name != "ctm":
        raise InvalidRequest(f"rank auto measures CtM's shared subspaces; method {method.name!r}"
                             " needs an explicit rank", code="invalid_parameter")
    if request.rank is not None:
        raise InvalidRequest("give a rank or min_energy (rank auto), not both",
                             code="invalid_parameter")
    if not (math.isfinite(energy) and 0.0 < energy <= 1.0):
        raise InvalidRequest(f"min_energy must be in (0, 1], got {energy}",
                             code="invalid_parameter")


def _check_ctm_options(method: MethodSpec, request: MergeRequest) -> None:
    """beta and subspace shape CtM's shared subspaces; other methods have none."""
    for name, value in (("beta", request.beta), ("subspace", request.subspace)):
        if value is not None and method.name != "ctm":
            raise InvalidRequest(f"{name} applies to method ctm only, not {method.name!r}",
                                 code="invalid_parameter")
    if request.beta is not None and not (0.0 <= request.beta <= 1.0):
        raise InvalidRequest(f"beta must be in [0, 1], got {request.beta}",
                             code="invalid_parameter")
    if request.subspace is not None and request.subspace not in SUBSPACE_MODES:
        raise InvalidRequest(f"subspace must be one of {', '.join(SUBSPACE_MODES)}, got "
                             f"{request.subspace!r}", code="invalid_parameter")


def unique_labels(labels: Sequence[str]) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return tuple(out)


def _check_base_models(adapters: Sequence[LoraAdapter], force: bool) -> None:
    names = {a.config.base_model_name_or_path for a in adapters} - {None, ""}
    if len(names) > 1 and not force:
        raise IncompatibleAdapters(
            f"inputs were trained on different base models ({', '.join(sorted(map(str, names)))});"
            " pass force to merge them anyway", code="base_model_mismatch")


def _same_layout(a: ModuleSpec, b: ModuleSpec) -> bool:
    return (a.kind == b.kind and a.delta_shape == b.delta_shape
            and a.a_shape[1:] == b.a_shape[1:] and a.b_shape[2:] == b.b_shape[2:])


def plan_merge(adapters: Sequence[LoraAdapter], request: MergeRequest) -> MergePlan:
    method, rule, params, weights = check_request(request, len(adapters))
    _check_base_models(adapters, request.force)
    by_module: dict[str, list[int]] = {}
    for index, adapter in enumerate(adapters):
        for name in adapter.modules:
            by_module.setdefault(name, []).append(index)
    modules = []
    for name in sorted(by_module):
        inputs = by_module[name]
        first = adapters[inputs[0]].modules[name]
        for index in inputs[1:]:
            other = adapters[index].modules[name]
            if not _same_layout(first, other):
                raise IncompatibleAdapters(
                    f"{name}: {adapters[inputs[0]].label} has a {first.kind} delta of shape "
                    f"{list(first.delta_shape)} but {adapters[index].label} has a {other.kind} "
                    f"delta of shape {list(other.delta_shape)}; they are not for the same "
                    "model", code="module_shape_mismatch")
        modules.append(ModulePlan(name=name, spec=first, inputs=tuple(inputs)))
    if method.takes_rank:
        assert request.rank is not None
        rank = request.rank
    else:
        rank = max(sum(adapters[i].modules[m.name].rank for i in m.inputs) for m in modules)
    check_rank(request.target, rank)
    dtype_name = serving_dtype(request.target, request.dtype)
    dtype = torch_dtype(OUTPUT_DTYPES[dtype_name]) if dtype_name else adapters[0].dtype
    return MergePlan(request=request, method=method, rule=rule, rule_params=params,
                     weights=weights, rank=rank, dtype=dtype,
                     labels=unique_labels([a.label for a in adapters]), modules=modules)
