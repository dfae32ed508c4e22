"""Which adapters to fold together, into how many, at what rank (docs/planning.md, "Planner").

Agglomerative clustering on the adapters' cosine (`similarity.factor_similarity`), under a
constraint checked with the automatic-rank machinery (`auto_rank.auto_rank_factors`,
`auto_rank.captured_energies`). Every adapter starts as its own cluster. At each step the
pairs of clusters are tried from the most similar (average linkage: the mean cosine over
their member pairs) down, and the first pair whose union is allowed is merged. Merging
stops when no pair is allowed, when one cluster is left, or when at most `max_groups`
remain. A union is allowed when:

1. its linkage is at least `min_similarity` (default 0: deltas pointing apart on average
   cancel in the merge's sum, whatever subspaces they share);
2. each member keeps ≥ `energy` of itself in every module it has under the union's CtM
   subspaces at the union's rank. With `rank=None` (auto) that rank is `auto_rank` of the
   members, and a union whose auto rank exceeds `max_rank` (default RANK_CAP_FACTOR × the
   largest input rank) is not formed. With a fixed rank R, every member must keep ≥ E at R;
3. with rank auto only, it saves rank: auto rank of the union < the sum of the parts' (a
   lone adapter counted at its own auto rank, its Eckart–Young truncation at E). CtM at the
   summed rank keeps inputs with disjoint subspaces whole, so without this rule (2) would
   fold unrelated adapters into a concatenation that needs as much rank as they do apart.

Clusters of one member are "left alone": nothing to merge. A group's members are reported
with their energy (min over modules) and the module where it is lowest.

Cost. The adapters are read once, module by module (`module_factors`). Each module's
factors go to the similarity and to one joint core space of every input that has it
(`core_space`: ΔW_t = Q_B K_t Q_Aᵀ, K_t = R_B^(t) R_A^(t)ᵀ); only the coordinates R_B
(k_B×R) and R_A (k_A×R) are kept, in float32, R = Σ_t r_t. k_B ≤ min(m, R) and k_A ≤
min(n, R), so the cache is 4·(k_B + k_A)·R bytes per module: never more than the factors
themselves in float32, and 8·R² bytes when R ≤ min(m, n) (T = 8, r = 16: 128 KiB per module,
28 MiB for the 224 modules of Llama-2-7B). A candidate union S is then evaluated from the
cache with no file read: its members' coordinates are factors of their deltas in an
orthonormal frame, so `auto_rank_factors` / `captured_energies` on them give the energies
they give on the files (to rounding), for O(Σ_mod k·R_S²) plus the rank scan's solves.
Unions are memoised and at most 2T − 1 clusters ever exist, so at most O(T²) unions are
evaluated; a step costs O(T²) linkages. Total: one read of every module of every adapter,
O(Σ_mod (m+n)·R²) for the read pass, and O(T²) cached evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lorafold.adapters.reader import LoraAdapter
from lorafold.errors import InvalidRequest
from lorafold.merge.auto_rank import (
    DEFAULT_ENERGY,
    ENERGY_TOL,
    auto_rank_factors,
    captured_energies,
)
from lorafold.merge.core_space import core_space
from lorafold.merge.plan import MAX_RANK, _check_base_models, unique_labels
from lorafold.merge.similarity import ModuleFactors, Pair, factor_similarity, module_factors

# rank auto: a group may need at most this multiple of the largest input rank.
RANK_CAP_FACTOR = 4
# Groups whose mean pairwise cosine is below this are not merged.
DEFAULT_MIN_SIMILARITY = 0.0

Reason = Literal["dissimilar", "energy", "no_saving"]


@dataclass(frozen=True)
class MemberEnergy:
    """What one member keeps of itself in the group's merge: its lowest energy over its
    modules, and that module."""

    input: str
    energy: float
    module: str


@dataclass(frozen=True)
class Group:
    name: str
    members: tuple[str, ...]
    indices: tuple[int, ...]
    rank: int
    parameters: int                     # rank · Σ (m + n) over the modules any member has
    energies: tuple[MemberEnergy, ...]
    worst: MemberEnergy                 # the lowest of them

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "members": list(self.members), "rank": self.rank,
                "parameters": self.parameters,
                "energies": [_energy_dict(e) for e in self.energies],
                "worst": _energy_dict(self.worst)}


@dataclass(frozen=True)
class Refusal:
    """A union the planner considered and did not form."""

    members: tuple[str, ...]
    reason: Reason
    message: str


@dataclass(frozen=True)
class GroupPlan:
    labels: tuple[str, ...]
    rank: int | None                    # None: auto
    min_energy: float
    max_rank: int | None                # rank auto: the cap on a group's rank
    max_groups: int | None
    min_similarity: float
    cosine: tuple[tuple[float, ...], ...]
    groups: tuple[Group, ...]
    left_alone: tuple[str, ...]
    parameters_before: int
    parameters_after: int
    refused: tuple[Refusal, ...]
    evaluations: int                    # unions whose energies were computed
    notes: tuple[str, ...] = field(default=())

    @property
    def adapters_after(self) -> int:
        return len(self.groups) + len(self.left_alone)

    @property
    def max_groups_reached(self) -> bool | None:
        return None if self.max_groups is None else self.adapters_after <= self.max_groups

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapters": list(self.labels),
            "rank": "auto" if self.rank is None else self.rank,
            "min_energy": self.min_energy, "max_rank": self.max_rank,
            "max_groups": self.max_groups, "min_similarity": self.min_similarity,
            "groups": [g.to_dict() for g in self.groups],
            "left_alone": list(self.left_alone),
            "adapters_after": self.adapters_after,
            "max_groups_reached": self.max_groups_reached,
            "parameters": {"before": self.parameters_before, "after": self.parameters_after},
            "similarity": {"labels": list(self.labels), "cosine": [list(r) for r in self.cosine]},
            "refused": [{"members": list(r.members), "reason": r.reason, "message": r.message}
                        for r in self.refused],
            "evaluations": self.evaluations,
            "notes": list(self.notes),
        }


def _energy_dict(e: MemberEnergy) -> dict[str, Any]:
    return {"input": e.input, "energy": e.energy, "module": e.module}


@dataclass(frozen=True)
class _CachedModule:
    """One module in the joint core space of the inputs that have it: input t's scaled B
    is Q_B·r_b[:, blocks[t]] and its Aᵀ is Q_A·r_a[:, blocks[t]] (float32)."""

    name: str
    r_b: torch.Tensor
    r_a: torch.Tensor
    blocks: dict[int, slice]
    size: int                           # m + n

    def factors(self, members: Sequence[int]) -> list[Pair | None]:
        """The members' factors in the core frame (k_B×r_t, r_t×k_A), None where absent."""
        return [(self.r_b[:, self.blocks[t]], self.r_a[:, self.blocks[t]].T)
                if t in self.blocks else None for t in members]


class _Cache:
    """Reads the module stream once: passes it on (to the similarity) and keeps each
    module's core coordinates, each input's parameter count and its largest rank."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.modules: list[_CachedModule] = []
        self.parameters = [0] * count
        self.max_rank = [0] * count

    def tee(self, modules: Iterable[ModuleFactors]) -> Iterator[ModuleFactors]:
        for name, pairs in modules:
            if len(pairs) != self.count:
                raise InvalidRequest(f"{name}: {len(pairs)} factor pairs for {self.count} "
                                     "adapters", code="invalid_parameter")
            inputs = [t for t, pair in enumerate(pairs) if pair is not None]
            if inputs:
                present = [pair for pair in pairs if pair is not None]
                space = core_space(present)
                size = present[0][0].shape[0] + present[0][1].shape[1]
                for t, (b, _) in zip(inputs, present, strict=True):
                    self.parameters[t] += b.shape[1] * size
                    self.max_rank[t] = max(self.max_rank[t], b.shape[1])
                self.modules.append(_CachedModule(
                    name=name, r_b=space.r_b.to(torch.float32), r_a=space.r_a.to(torch.float32),
                    blocks=dict(zip(inputs, space.blocks, strict=True)), size=size))
                del space                # its bases hold the full factors
            yield name, pairs


@dataclass(frozen=True)
class _Fit:
    rank: int
    energies: dict[str, dict[str, float]]   # module -> member label -> energy at rank


class _Planner:
    def __init__(self, cache: _Cache, labels: Sequence[str], cosine: torch.Tensor, *,
                 rank: int | None, energy: float, cap: int | None,
                 min_similarity: float) -> None:
        self.cache, self.labels, self.cosine = cache, labels, cosine
        self.rank, self.energy, self.cap = rank, energy, cap
        self.min_similarity = min_similarity
        self.fits: dict[frozenset[int], _Fit | str] = {}
        self.own_ranks: dict[int, int] = {}

    def modules_of(self, members: Iterable[int]) -> list[_CachedModule]:
        wanted = set(members)
        return [m for m in self.cache.modules if wanted & m.blocks.keys()]

    def linkage(self, a: frozenset[int], b: frozenset[int]) -> float:
        return sum(float(self.cosine[i, j]) for i in a for j in b) / (len(a) * len(b))

    def fit(self, members: frozenset[int]) -> _Fit | str:
        """The union's rank and energies, or why no rank allowed keeps every member ≥ E."""
        if members not in self.fits:
            self.fits[members] = self._fit(sorted(members))
        return self.fits[members]

    def _fit(self, members: list[int]) -> _Fit | str:
        labels = [self.labels[t] for t in members]
        modules = self.modules_of(members)
        if self.rank is None:
            try:
                choice = auto_rank_factors(((m.name, m.factors(members)) for m in modules),
                                           labels=labels, energy=self.energy, cap=self.cap)
            except InvalidRequest as e:
                if e.code != "rank_unreachable":
                    raise
                return e.message
            return _Fit(choice.rank, choice.energies)
        energies: dict[str, dict[str, float]] = {}
        for m in modules:
            present = [t for t in members if t in m.blocks]
            found = captured_energies([p for p in m.factors(present) if p is not None],
                                      [self.rank])[0]
            energies[m.name] = {self.labels[t]: float(e)
                                for t, e in zip(present, found.tolist(), strict=True)}
        worst = _worst(energies)
        if worst.energy < self.energy - ENERGY_TOL:
            return (f"at rank {self.rank}, {worst.input} keeps {worst.energy:.4f} of its "
                    f"energy in {worst.module} (< {self.energy})")
        return _Fit(self.rank, energies)

    def own_rank(self, t: int) -> int:
        """A lone adapter's auto rank at E: its own Eckart–Young truncation."""
        if t not in self.own_ranks:
            try:
                self.own_ranks[t] = auto_rank_factors(
                    ((m.name, m.factors([t])) for m in self.modules_of([t])),
                    labels=[self.labels[t]], energy=self.energy).rank
            except InvalidRequest as e:   # E within rounding of 1: it keeps all at its rank
                if e.code != "rank_unreachable":
                    raise
                self.own_ranks[t] = self.cache.max_rank[t]
        return self.own_ranks[t]

    def part_rank(self, part: frozenset[int]) -> int:
        if len(part) == 1:
            return self.own_rank(next(iter(part)))
        found = self.fit(part)
        assert isinstance(found, _Fit)       # a part was formed, so it fitted
        return found.rank

    def refusal(self, a: frozenset[int], b: frozenset[int], link: float,
                ) -> tuple[Reason, str] | None:
        """Why a ∪ b may not be formed (the module docstring's rules), or None."""
        if link < self.min_similarity:
            return "dissimilar", (f"mean cosine {link:.4f} is below the minimum similarity "
                                  f"{self.min_similarity}")
        found = self.fit(a | b)
        if isinstance(found, str):
            return "energy", found
        if self.rank is None:
            apart = self.part_rank(a) + self.part_rank(b)
            if found.rank >= apart:
                return "no_saving", (f"together they need rank {found.rank}, apart "
                                     f"{self.part_rank(a)} + {self.part_rank(b)}: no shared "
                                     "subspace to save")
        return None


def _worst(energies: dict[str, dict[str, float]]) -> MemberEnergy:
    module, label = min(((m, t) for m, row in energies.items() for t in row),
                        key=lambda key: energies[key[0]][key[1]])
    return MemberEnergy(label, energies[module][label], module)


def _cluster(planner: _Planner, count: int, max_groups: int | None,
             ) -> tuple[list[frozenset[int]], dict[frozenset[int], tuple[Reason, str]]]:
    """Average-linkage agglomeration, most similar allowed pair first."""
    clusters = [frozenset({t}) for t in range(count)]
    refused: dict[frozenset[int], tuple[Reason, str]] = {}
    while len(clusters) > 1 and (max_groups is None or len(clusters) > max_groups):
        pairs = sorted(((planner.linkage(clusters[i], clusters[j]), i, j)
                        for i in range(len(clusters)) for j in range(i + 1, len(clusters))),
                       key=lambda x: (-x[0], x[1], x[2]))
        for link, i, j in pairs:
            union = clusters[i] | clusters[j]
            if union in refused:
                continue
            why = planner.refusal(clusters[i], clusters[j], link)
            if why is not None:
                refused[union] = why
                continue
            clusters = sorted([c for k, c in enumerate(clusters) if k not in (i, j)] + [union],
                              key=min)
            break
        else:
            break
    return clusters, refused


def check_plan_options(rank: int | None, energy: float, max_rank: int | None,
                       max_groups: int | None, min_similarity: float) -> None:
    """What a plan request can be refused for before any adapter is read."""
    if not (math.isfinite(energy) and 0.0 < energy <= 1.0):
        raise InvalidRequest(f"min_energy must be in (0, 1], got {energy}",
                             code="invalid_parameter")
    if rank is not None and not 1 <= rank <= MAX_RANK:
        raise InvalidRequest(f"rank must be between 1 and {MAX_RANK}, got {rank}",
                             code="invalid_parameter")
    if rank is not None and max_rank is not None:
        raise InvalidRequest("max_rank caps rank auto; give a rank or max_rank, not both",
                             code="invalid_parameter")
    if max_rank is not None and not 1 <= max_rank <= MAX_RANK:
        raise InvalidRequest(f"max_rank must be between 1 and {MAX_RANK}, got {max_rank}",
                             code="invalid_parameter")
    if max_groups is not None and max_groups < 1:
        raise InvalidRequest(f"max_groups must be at least 1, got {max_groups}",
                             code="invalid_parameter")
    if not (math.isfinite(min_similarity) and -1.0 <= min_similarity <= 1.0):
        raise InvalidRequest(f"min_similarity must be in [-1, 1], got {min_similarity}",
                             code="invalid_parameter")


def plan_groups_factors(modules: Iterable[ModuleFactors], *, labels: Sequence[str],
                        rank: int | None = None, energy: float = DEFAULT_ENERGY,
                        max_rank: int | None = None, max_groups: int | None = None,
                        min_similarity: float = DEFAULT_MIN_SIMILARITY) -> GroupPlan:
    """The grouping of the module docstring, for T = len(labels) adapters given module by
    module as (name, [(s_t·B_t, A_t) in float32, or None] × T); `modules` is read once."""
    check_plan_options(rank, energy, max_rank, max_groups, min_similarity)
    if len(labels) < 2:
        raise InvalidRequest(f"a plan needs at least 2 adapters, got {len(labels)}",
                             code="too_few_inputs")
    labels = tuple(labels)
    cache = _Cache(len(labels))
    cosine = factor_similarity(cache.tee(modules), labels=labels).cosine
    cap = None if rank is not None else (
        max_rank if max_rank is not None else RANK_CAP_FACTOR * max(cache.max_rank))
    planner = _Planner(cache, labels, cosine, rank=rank, energy=energy, cap=cap,
                       min_similarity=min_similarity)
    clusters, refused = _cluster(planner, len(labels), max_groups)
    groups: list[Group] = []
    for cluster in (c for c in clusters if len(c) > 1):
        members = sorted(cluster)
        found = planner.fit(cluster)
        assert isinstance(found, _Fit)
        per_member = [_worst({m: {labels[t]: row[labels[t]]} for m, row in found.energies.items()
                              if labels[t] in row}) for t in members]
        groups.append(Group(
            name=f"group-{len(groups) + 1}", members=tuple(labels[t] for t in members),
            indices=tuple(members), rank=found.rank,
            parameters=found.rank * sum(m.size for m in planner.modules_of(members)),
            energies=tuple(per_member), worst=_worst(found.energies)))
    alone = [next(iter(c)) for c in clusters if len(c) == 1]
    before = sum(cache.parameters)
    after = sum(g.parameters for g in groups) + sum(cache.parameters[t] for t in alone)
    refusals = tuple(Refusal(tuple(labels[t] for t in sorted(u)), reason, message)
                     for u, (reason, message) in refused.items())
    return GroupPlan(
        labels=labels, rank=rank, min_energy=energy, max_rank=cap, max_groups=max_groups,
        min_similarity=min_similarity, cosine=tuple(tuple(r) for r in cosine.tolist()),
        groups=tuple(groups), left_alone=tuple(labels[t] for t in alone),
        parameters_before=before, parameters_after=after, refused=refusals,
        evaluations=len(planner.fits), notes=_notes(groups, clusters, max_groups, refusals))


def _notes(groups: Sequence[Group], clusters: Sequence[frozenset[int]], max_groups: int | None,
           refused: Sequence[Refusal]) -> tuple[str, ...]:
    notes = []
    if not groups:
        first = f" (the most similar pair: {refused[0].message})" if refused else ""
        notes.append(f"no two adapters can be folded under the constraint{first}; every "
                     "adapter is left alone")
    if max_groups is not None and len(clusters) > max_groups:
        notes.append(f"max_groups {max_groups} not reached: the constraint allows no fewer "
                     f"than {len(clusters)} adapters")
    return tuple(notes)


def plan_groups(adapters: Sequence[LoraAdapter], *, rank: int | None = None,
                energy: float = DEFAULT_ENERGY, max_rank: int | None = None,
                max_groups: int | None = None,
                min_similarity: float = DEFAULT_MIN_SIMILARITY, force: bool = False,
                ) -> GroupPlan:
    """`plan_groups_factors` of opened adapters (same base model unless `force`), read
    module by module on the CPU; labelled as a merge labels them."""
    check_plan_options(rank, energy, max_rank, max_groups, min_similarity)
    if len(adapters) < 2:
        raise InvalidRequest(f"a plan needs at least 2 adapters, got {len(adapters)}",
                             code="too_few_inputs")
    _check_base_models(adapters, force)
    return plan_groups_factors(module_factors(adapters),
                               labels=unique_labels([a.label for a in adapters]), rank=rank,
                               energy=energy, max_rank=max_rank, max_groups=max_groups,
                               min_similarity=min_similarity)
