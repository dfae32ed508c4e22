"""The smallest output rank at which CtM keeps enough of every input (docs/planning.md).

At output rank r, CtM projects each module onto shared subspaces U_r = Q_B P, V_r = Q_A Q
found by `shared_subspaces` on the β-rescaled stack of cores (methods.py, `merge_ctm`). The
share of input t that survives there is its captured energy

    e_t(r) = ‖Pᵀ K_t Q‖²_F / ‖K_t‖²_F = ‖U_rᵀ ΔW_t V_r‖²_F / ‖ΔW_t‖²_F,

computed here exactly as `merge_ctm` computes its subspaces (same core space, same stack,
same solver; defaults β = DEFAULT_BETA = 0 and subspace DEFAULT_SUBSPACE = hooi, every input
at weight 1; at β = 0 any non-zero weights give the same subspaces). `auto_rank` returns the
smallest single r ≤ cap with e_t(r) ≥ E for every input in every module it has.

e_t(r) is not monotone in r under HOOI: the rank-r and rank-(r+1) optima need not be nested,
and HOOI maximises the sum over inputs, so one input can lose most of its share when the
rank grows (40 random 40×36 stacks, T = 2–5, r_t = 2–5, norms spread up to 21×, β = 0:
some input's energy fell from one rank to the next in 31, by up to 0.87; the minimum over
inputs fell in 2). HOOI's gain in total energy can also cost the worst input: it may need
a larger rank than under HOSVD. Under HOSVD it is monotone: P_r and Q_r are the leading
eigenvectors of fixed Grams, so the subspaces are nested and ‖Π_P K Π_Q‖² only grows with
them. So the search is a scan, exact in both modes:

1. two rigorous lower bounds. Pᵀ K_t Q has rank ≤ r, so e_t(r) ≤ the share of ‖K_t‖² in
   its top r singular values (Eckart–Young). And if every e_t ≥ E, then so is their mean
   weighted by ‖X̃_t‖², Σ_t ‖Pᵀ X̃_t Q‖² / Σ_t ‖X̃_t‖², which is ≤ the share of the top r
   eigenvalues of G = Σ X̃_t X̃_tᵀ (and of H = Σ X̃_tᵀ X̃_t) in their trace (Ky Fan). No r
   below the largest rank these allow can pass;
2. for r = bound, bound + 1, …, cap: check the modules, the one that failed last first;
   the first failure rejects r. The first r that every module passes is the answer.

Each check is one `shared_subspaces` call on k×R matrices (k ≤ R = Σ r_t): a rank that
fails usually costs one call, the answer one per module, and the second bound usually
starts the scan a few ranks below the answer. The core spaces are built once, module by
module; only the rescaled stacks are kept (2·k·R float64 per module: 256 KiB at R = 128).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from lorafold.adapters.reader import LoraAdapter
from lorafold.errors import InvalidRequest
from lorafold.merge.conform import VLLM_MAX_RANK
from lorafold.merge.core_space import core_space
from lorafold.merge.methods import rescaled_weights
from lorafold.merge.options import (
    DEFAULT_BETA,
    DEFAULT_MIN_ENERGY,
    DEFAULT_SUBSPACE,
    SUBSPACE_MODES,
)
from lorafold.merge.plan import MergeRequest, unique_labels
from lorafold.merge.similarity import ModuleFactors, Pair, module_factors, one_cpu_thread
from lorafold.merge.subspaces import FactorStack, shared_subspaces

# Every input keeps at least this share of its energy in every module. A worst case over
# modules and inputs, so it asks for more than the merge report's mean energies suggest.
DEFAULT_ENERGY = DEFAULT_MIN_ENERGY
# An energy within this of the target meets it (the full-rank energy is 1 to rounding).
ENERGY_TOL = 1e-9


@dataclass(frozen=True)
class RankChoice:
    """The chosen rank and, at it, each input's captured energy per module."""

    rank: int
    target: float
    cap: int
    beta: float                                 # the CtM options the energies are for
    subspace: str
    lower_bound: int                            # where the scan started (the bounds allow no less)
    energies: dict[str, dict[str, float]]       # module -> input label -> e_t(rank)
    worst_module: str
    worst_input: str
    worst_energy: float
    solves: int                                 # shared_subspaces calls made


@dataclass
class _Module:
    """What the search keeps of one module's core space: the rescaled stack X̃_t = c_t K_t as
    factors (k×Tρ each, float64) and a few numbers per input."""

    name: str
    inputs: tuple[int, ...]
    stack: FactorStack
    scales: torch.Tensor                        # c_t
    norms: torch.Tensor                         # ‖K_t‖ = ‖ΔW_t‖
    dim: int                                    # min(k_B, k_A): ctm's largest rank here
    spectra: list[torch.Tensor]                 # cumulative top-r shares: each K_t, then G, H
    cache: dict[int, torch.Tensor] = field(default_factory=dict)

    def need(self, target: float) -> tuple[int, int | None]:
        """The smallest rank that the bounds allow, and what sets it: an input's position,
        or None for the stack."""
        needs = [int((cum < target - ENERGY_TOL).sum()) + 1 for cum in self.spectra]
        worst = max(range(len(needs)), key=needs.__getitem__)
        return needs[worst], worst if worst < len(self.inputs) else None


def _shares(values: torch.Tensor) -> torch.Tensor:
    """Cumulative shares of the non-negative `values`, largest first (all 1 if they are 0)."""
    values = values.clamp(min=0).sort(descending=True).values
    total = float(values.sum())
    return (values.cumsum(0) / total if total > 0 else torch.ones_like(values)).cpu()


def _module(name: str, inputs: tuple[int, ...], pairs: Sequence[Pair], beta: float) -> _Module:
    """Core space and rescaled stack as `merge_ctm` builds them, and the two lower bounds:
    e_t(r) ≤ the top-r share of ‖K_t‖² (Eckart–Young), and, since Σ_t ‖Pᵀ X̃_t Q‖² ≤
    tr(Pᵀ G P) ≤ the top r eigenvalues of G = Σ X̃_t X̃_tᵀ (and the same for H = Σ X̃_tᵀ X̃_t),
    every e_t ≥ E needs the top r eigenvalues of G and of H to hold E of their trace."""
    space = core_space(pairs)
    norms = space.core_norms()
    ones = torch.ones(len(pairs), dtype=torch.float64, device=norms.device)
    scales = rescaled_weights(ones, norms, beta)
    stack = space.factor_stack(scales)
    spectra = [_shares(torch.linalg.svdvals(torch.linalg.qr(space.r_b[:, s])[1]
                                            @ torch.linalg.qr(space.r_a[:, s])[1].T) ** 2)
               for s in space.blocks]
    spectra += [_shares(torch.linalg.eigvalsh(gram)) for gram in stack.grams()]
    return _Module(name=name, inputs=inputs, stack=stack, scales=scales, norms=norms,
                   dim=min(space.left.dim, space.right.dim), spectra=spectra)


def _energies(module: _Module, rank: int, subspace: str) -> torch.Tensor:
    """e_t at output rank `rank` (ctm uses min(rank, k_B, k_A) here), cached. An input with
    c_t = 0 (a zero delta) has nothing to lose: e_t = 1."""
    rank = min(rank, module.dim)
    if rank not in module.cache:
        found = shared_subspaces(module.stack, rank, subspace)
        coords = module.stack.coordinates(found.p, found.q)        # Pᵀ X̃_t Q, T×r×r
        squares = (module.scales * module.norms) ** 2               # ‖X̃_t‖²
        shares = torch.where(squares > 0, coords.pow(2).sum(dim=(1, 2))
                             / torch.where(squares > 0, squares, 1.0), 1.0)
        module.cache[rank] = shares.clamp(max=1.0).cpu()
    return module.cache[rank]


def captured_energies(factors: Sequence[Pair], ranks: Sequence[int], *,
                      beta: float = DEFAULT_BETA, subspace: str = DEFAULT_SUBSPACE,
                      ) -> torch.Tensor:
    """e_t(r) of one module's inputs ((s_t·B_t, A_t) in float32) at each of `ranks`:
    len(ranks)×T, float64, from one core space."""
    _check_options(DEFAULT_ENERGY, None, beta, subspace)
    if not ranks or min(ranks) < 1:
        raise InvalidRequest(f"ranks must be at least 1, got {list(ranks)}",
                             code="invalid_parameter")
    with one_cpu_thread(factors):
        module = _module("", tuple(range(len(factors))), factors, beta)
        return torch.stack([_energies(module, r, subspace) for r in ranks])


def _check_options(energy: float, cap: int | None, beta: float, subspace: str) -> None:
    if not 0.0 < energy <= 1.0:
        raise InvalidRequest(f"energy must be in (0, 1], got {energy}", code="invalid_parameter")
    if cap is not None and cap < 1:
        raise InvalidRequest(f"rank cap must be at least 1, got {cap}", code="invalid_parameter")
    if not 0.0 <= beta <= 1.0:
        raise InvalidRequest(f"beta must be in [0, 1], got {beta}", code="invalid_parameter")
    if subspace not in SUBSPACE_MODES:
        raise InvalidRequest(f"subspace must be one of {', '.join(SUBSPACE_MODES)}, got "
                             f"{subspace!r}", code="invalid_parameter")


def _at_rank(modules: Sequence[_Module], labels: Sequence[str], rank: int, subspace: str,
             ) -> tuple[dict[str, dict[str, float]], str, str]:
    """Every input's e_t(rank) per module, and the module and input where it is lowest."""
    energies = {m.name: {labels[t]: float(e) for t, e in
                         zip(m.inputs, _energies(m, rank, subspace).tolist(), strict=True)}
                for m in modules}
    module, label = min(((m, t) for m, row in energies.items() for t in row),
                        key=lambda key: energies[key[0]][key[1]])
    return energies, module, label


def _unreachable(modules: Sequence[_Module], labels: Sequence[str], target: float, cap: int,
                 bound: int, subspace: str) -> InvalidRequest:
    """The refusal, naming the module and the input that keeps least at rank `cap`, and the
    most that input keeps there at any rank ≤ cap.

    When the bounds already exceed `cap`, the module is the one that sets them (some input
    there keeps < E at every rank ≤ cap: they bound a weighted mean of the e_t); else the
    one with the lowest energy at `cap`.
    """
    if bound > cap:
        (need, source), worst = max(((m.need(target), m) for m in modules),
                                    key=lambda x: x[0][0])
        why = (f"; its rank-{cap} subspaces cannot hold {target} of the stack of inputs "
               f"(that needs rank ≥ {need})" if source is None else
               f"; even the best rank-{cap} approximation of "
               f"{labels[worst.inputs[source]]} keeps less (it needs rank ≥ {need})")
    else:
        _, name, _ = _at_rank(modules, labels, cap, subspace)
        worst, why = next(m for m in modules if m.name == name), ""
    at_cap = _energies(worst, cap, subspace)
    t = int(at_cap.argmin())
    label = labels[worst.inputs[t]]
    curve = [float(_energies(worst, r, subspace)[t]) for r in range(1, min(cap, worst.dim) + 1)]
    best_rank = max(range(len(curve)), key=curve.__getitem__) + 1
    return InvalidRequest(
        f"no rank ≤ {cap} keeps {target} of every input's energy in every module: in "
        f"{worst.name}, {label} keeps {float(at_cap[t]):.4f} at rank {cap} and at most "
        f"{curve[best_rank - 1]:.4f} at any rank ≤ {cap} (at rank {best_rank}){why}",
        code="rank_unreachable", input=label, module=worst.name,
        energy=curve[best_rank - 1], energy_at_cap=float(at_cap[t]), cap=cap)


def auto_rank_factors(modules: Iterable[ModuleFactors], *, labels: Sequence[str] | None = None,
                      energy: float = DEFAULT_ENERGY, cap: int | None = None,
                      beta: float = DEFAULT_BETA, subspace: str = DEFAULT_SUBSPACE,
                      ) -> RankChoice:
    """The smallest rank r ≤ cap at which every input keeps ≥ `energy` of itself in every
    module under CtM's shared subspaces (module docstring). `modules` yields (name, [scaled
    (B, A) in float32, or None] × T), one module at a time. `cap` defaults to the largest
    rank any module can use (min(Σ r_t, m, n)). Raises InvalidRequest(code=
    "rank_unreachable") naming the worst input and module when no r ≤ cap meets `energy`.
    """
    _check_options(energy, cap, beta, subspace)
    with contextlib.ExitStack() as threads:
        kept: list[_Module] = []
        count = len(labels) if labels is not None else None
        for name, factors in modules:
            count = len(factors) if count is None else count
            if len(factors) != count:
                raise InvalidRequest(f"{name}: {len(factors)} factor pairs for {count} "
                                     "adapters", code="invalid_parameter")
            inputs = tuple(t for t, pair in enumerate(factors) if pair is not None)
            if not inputs:
                continue
            if not kept:
                threads.enter_context(one_cpu_thread(factors))
            kept.append(_module(name, inputs, [p for p in factors if p is not None], beta))
        if not kept or count is None:
            raise InvalidRequest("no modules to choose a rank for", code="no_inputs")
        names = tuple(labels) if labels is not None else tuple(str(t) for t in range(count))
        return _search(kept, names, energy, cap, beta, subspace)


def _search(modules: list[_Module], labels: Sequence[str], energy: float, cap: int | None,
            beta: float, subspace: str) -> RankChoice:
    """The scan of the module docstring, from the bounds to `cap`."""
    limit = cap if cap is not None else max(m.dim for m in modules)
    bound = max(m.need(energy)[0] for m in modules)
    order = list(modules)
    for rank in range(bound, limit + 1):
        failed = next((m for m in order
                       if float(_energies(m, rank, subspace).min()) < energy - ENERGY_TOL), None)
        if failed is None:
            energies, module, label = _at_rank(modules, labels, rank, subspace)
            return RankChoice(rank=rank, target=energy, cap=limit, beta=beta, subspace=subspace,
                              lower_bound=bound,
                              energies=energies, worst_module=module, worst_input=label,
                              worst_energy=energies[module][label],
                              solves=sum(len(m.cache) for m in modules))
        order.remove(failed)
        order.insert(0, failed)
    raise _unreachable(modules, labels, energy, limit, bound, subspace)


def auto_rank(adapters: Sequence[LoraAdapter], *, energy: float = DEFAULT_ENERGY,
              cap: int | None = None, beta: float = DEFAULT_BETA,
              subspace: str = DEFAULT_SUBSPACE, device: torch.device | str = "cpu",
              ) -> RankChoice:
    """`auto_rank_factors` of opened adapters, read module by module as a merge reads them;
    labelled as a merge labels them."""
    if not adapters:
        raise InvalidRequest("auto rank needs at least one adapter", code="no_inputs")
    return auto_rank_factors(module_factors(adapters, device=device),
                             labels=unique_labels([a.label for a in adapters]), energy=energy,
                             cap=cap, beta=beta, subspace=subspace)


def choose_rank(adapters: Sequence[LoraAdapter], request: MergeRequest) -> RankChoice:
    """The rank of a request with `min_energy` (rank "auto"), under its CtM options and
    capped by its serving target's limit."""
    assert request.min_energy is not None
    cap = VLLM_MAX_RANK if request.target == "vllm" else None
    return auto_rank(adapters, energy=request.min_energy, cap=cap, beta=request.ctm_beta,
                     subspace=request.ctm_subspace)


def rank_summary(choice: RankChoice) -> dict[str, object]:
    """What a merge report says of its automatic rank: the rank, the bound it met, and
    each input's worst and mean energy over its modules (the full table stays in memory)."""
    per_input: dict[str, list[float]] = {}
    for row in choice.energies.values():
        for label, energy in row.items():
            per_input.setdefault(label, []).append(energy)
    return {"rank": choice.rank, "min_energy": choice.target, "cap": choice.cap,
            "beta": choice.beta, "subspace": choice.subspace,
            "worst": {"module": choice.worst_module, "input": choice.worst_input,
                      "energy": choice.worst_energy},
            "inputs": [{"input": label, "min_energy": min(values),
                        "mean_energy": sum(values) / len(values)}
                       for label, values in per_input.items()]}
