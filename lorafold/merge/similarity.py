"""How alike a set of LoRA adapters are, from their factors alone (docs/planning.md).

Per module, with ΔW_t = s_t B_t A_t (B_t m×r_t, A_t r_t×n):

- inner product  ⟨ΔW_i, ΔW_j⟩_F = tr((B_iᵀB_j)(A_jA_iᵀ)) = Σ (B_iᵀB_j) ⊙ (A_iA_jᵀ): r×r
                 products, never m×n; ‖ΔW_i‖²_F is the diagonal.
- overlap        of the inputs' top-k singular subspaces, from a thin QR of each factor and
                 an r×r SVD: U_t (m×k_t) and V_t (n×k_t), and
                 overlap(i, j) = ‖U_iᵀU_j‖²_F / min(k_i, k_j) ∈ [0, 1]: 1 when the smaller
                 subspace lies in the larger (the same subspace when k_i = k_j), 0 when
                 they are orthogonal. `left` compares column (output) spaces, `right` row
                 (input) spaces.

Over the modules two adapters share, the cosine is
Σ_mod ⟨ΔW_i, ΔW_j⟩ / sqrt(Σ_mod ‖ΔW_i‖² · Σ_mod ‖ΔW_j‖²): the cosine of the two adapters'
deltas concatenated over those modules, so each module counts by its energy, and a module
whose deltas are tiny cannot swing the result. The overlaps are averaged over the same
modules with weights ‖ΔW_i‖·‖ΔW_j‖ (the weights the cosine gives each module's own cosine),
normalised to a mean so they stay in [0, 1].

Everything depends only on the deltas, so a gauge change (B G, G⁻¹ A) changes nothing.
Cost per module: O((m+n)·R²) for R = Σ r_t (the two Grams of the stacked factors and the
bases of the top subspaces); memory is one module's factors for all inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lorafold.adapters.reader import LoraAdapter
from lorafold.errors import IncompatibleAdapters, InvalidRequest
from lorafold.merge.plan import unique_labels
from lorafold.merge.rules import numerical_rank
from lorafold.merge.threads import torch_threads

Pair = tuple[torch.Tensor, torch.Tensor]      # (s_t·B_t m×r_t, A_t r_t×n): the scale in B
ModuleFactors = tuple[str, Sequence[Pair | None]]   # a module and each input's pair (or None)

# The factors are stored in float32 (or less): singular values below its precision, relative
# to the largest, are zero when the top subspaces are chosen.
FACTOR_DTYPE = torch.float32


@contextlib.contextmanager
def one_cpu_thread(factors: Sequence[Pair | None]) -> Iterator[None]:
    """One torch thread while the planner works on CPU factors, then the caller's count.

    Its ops are r×r to R×R, plus Grams and QRs of m×R factors: all short, so with every
    thread each mostly waits at a barrier when another process holds a core. Measured on
    2 shared cores (load ≈ 2.3), T = 8, r = 16: similarity of two Llama-2-7B layers took
    0.41–0.44 s on one thread against 0.46–1.39 s under the merge's adaptive policy
    (`threads.py`), whose probes on all threads cost more than they save in a run this
    short; the rank search over four 4096×4096 modules 0.53 s against 13 s (2.4 s on two
    threads throughout).
    """
    first = next((pair[0] for pair in factors if pair is not None), None)
    if first is None or first.device.type != "cpu":
        yield
        return
    with torch_threads(1):
        yield


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), 0.0)


@dataclass(frozen=True)
class ModuleSimilarity:
    """One module: `inputs` are the indices of the adapters that have it; the matrices are
    indexed by position in `inputs`."""

    name: str
    inputs: tuple[int, ...]
    inner: torch.Tensor          # ⟨ΔW_i, ΔW_j⟩_F, float64
    overlap_left: torch.Tensor   # ‖U_iᵀU_j‖² / min(k_i, k_j)
    overlap_right: torch.Tensor  # ‖V_iᵀV_j‖² / min(k_i, k_j)
    ranks: tuple[int, ...]       # k_t: the top-subspace dimension used for each input

    @property
    def norms(self) -> torch.Tensor:
        """‖ΔW_t‖_F for each input that has the module."""
        return self.inner.diagonal().clamp(min=0).sqrt()

    @property
    def cosine(self) -> torch.Tensor:
        return _ratio(self.inner, torch.outer(self.norms, self.norms)).clamp(-1.0, 1.0)


@dataclass(frozen=True)
class Similarity:
    """T×T matrices over the adapters (float64), aggregated over the modules each pair
    shares; a pair that shares no module has cosine and overlaps 0."""

    labels: tuple[str, ...]
    cosine: torch.Tensor
    overlap_left: torch.Tensor
    overlap_right: torch.Tensor
    shared_modules: torch.Tensor   # int64: how many modules each pair shares
    modules: dict[str, ModuleSimilarity]

    @property
    def overlap(self) -> torch.Tensor:
        """The mean of the left and right overlaps."""
        return (self.overlap_left + self.overlap_right) / 2


def _top_subspaces(b: torch.Tensor, a: torch.Tensor, top_k: int | None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases (m×k, n×k) of the top-k left and right singular subspaces of B A,
    with k = min(top_k, numerical rank): thin QRs B = Q_B R_B, Aᵀ = Q_A R_A and the SVD of
    the r×r core R_B R_Aᵀ."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    k = numerical_rank(s, (b.shape[0], a.shape[1]), FACTOR_DTYPE)
    if top_k is not None:
        k = min(k, top_k)
    return q_b @ u[:, :k], q_a @ vh[:k].T


def _overlaps(bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖X_iᵀX_j‖²_F / min(k_i, k_j) for orthonormal bases X_t (0 where either is empty)."""
    widths = [x.shape[1] for x in bases]
    stacked = torch.cat(list(bases), dim=1)
    gram = (stacked.T @ stacked).pow(2)
    owner = torch.repeat_interleave(torch.arange(len(bases), device=stacked.device),
                                    torch.tensor(widths, device=stacked.device))
    indicator = torch.nn.functional.one_hot(owner, len(bases)).to(gram.dtype)
    sums = indicator.T @ gram @ indicator
    smaller = torch.tensor(widths, dtype=gram.dtype, device=gram.device)
    smaller = torch.minimum(smaller.unsqueeze(0), smaller.unsqueeze(1))
    return torch.where(smaller > 0, sums / smaller.clamp(min=1), 0.0).clamp(max=1.0)


def module_similarity(name: str, factors: Sequence[Pair | None], *,
                      top_k: int | None = None) -> ModuleSimilarity:
    """Inner products and top-subspace overlaps of one module's deltas (scaled B, A pairs;
    None for an input without the module), in float64 on the factors' device."""
    if top_k is not None and top_k < 1:
        raise InvalidRequest(f"top_k must be at least 1, got {top_k}", code="invalid_parameter")
    inputs = tuple(t for t, pair in enumerate(factors) if pair is not None)
    pairs = [(b.to(torch.float64), a.to(torch.float64))
             for b, a in (pair for pair in factors if pair is not None)]
    if not pairs:
        empty = torch.zeros(0, 0, dtype=torch.float64)
        return ModuleSimilarity(name, (), empty, empty, empty, ())
    left = torch.cat([b for b, _ in pairs], dim=1)
    right = torch.cat([a for _, a in pairs], dim=0)
    ranks = torch.tensor([b.shape[1] for b, _ in pairs], device=left.device)
    owner = torch.repeat_interleave(torch.arange(len(pairs), device=left.device), ranks)
    indicator = torch.nn.functional.one_hot(owner, len(pairs)).to(torch.float64)
    products = (left.T @ left) * (right @ right.T)           # (B_iᵀB_j) ⊙ (A_iA_jᵀ), R×R
    inner = indicator.T @ products @ indicator
    inner = (inner + inner.T) / 2
    subspaces = [_top_subspaces(b, a, top_k) for b, a in pairs]
    return ModuleSimilarity(
        name=name, inputs=inputs, inner=inner,
        overlap_left=_overlaps([u for u, _ in subspaces]),
        overlap_right=_overlaps([v for _, v in subspaces]),
        ranks=tuple(u.shape[1] for u, _ in subspaces))


@dataclass
class _Totals:
    """Running sums over modules for T adapters (entry [i, j] over the modules i and j share)."""

    inner: torch.Tensor          # Σ ⟨ΔW_i, ΔW_j⟩
    energy: torch.Tensor         # Σ ‖ΔW_i‖²
    weight: torch.Tensor         # Σ ‖ΔW_i‖‖ΔW_j‖
    left: torch.Tensor           # Σ ‖ΔW_i‖‖ΔW_j‖·overlap_left
    right: torch.Tensor          # Σ ‖ΔW_i‖‖ΔW_j‖·overlap_right
    shared: torch.Tensor         # how many modules

    @classmethod
    def zeros(cls, count: int) -> _Totals:
        def z() -> torch.Tensor:
            return torch.zeros(count, count, dtype=torch.float64)
        return cls(z(), z(), z(), z(), z(), torch.zeros(count, count, dtype=torch.int64))

    def add(self, found: ModuleSimilarity) -> None:
        index = torch.tensor(found.inputs)
        cell = (index.unsqueeze(1), index.unsqueeze(0))
        norms = found.norms.cpu()
        pair_weight = torch.outer(norms, norms)
        self.inner[cell] += found.inner.cpu()
        self.energy[cell] += (norms**2).unsqueeze(1).expand(-1, len(index))
        self.weight[cell] += pair_weight
        self.left[cell] += pair_weight * found.overlap_left.cpu()
        self.right[cell] += pair_weight * found.overlap_right.cpu()
        self.shared[cell] += 1


def factor_similarity(modules: Iterable[ModuleFactors], *, labels: Sequence[str] | None = None,
                      top_k: int | None = None) -> Similarity:
    """Similarity of T adapters given module by module as (name, [pair or None] × T).

    `modules` may be a generator: only one module's factors are held at a time. T is
    len(labels) when given, else the length of the first module's list.
    """
    count = len(labels) if labels is not None else None
    totals = _Totals.zeros(count) if count is not None else None
    details: dict[str, ModuleSimilarity] = {}
    with contextlib.ExitStack() as threads:
        for name, factors in modules:
            if totals is None:
                count = len(factors)
                totals = _Totals.zeros(count)
            if len(factors) != count:
                raise InvalidRequest(f"{name}: {len(factors)} factor pairs for {count} "
                                     "adapters", code="invalid_parameter")
            if not details:
                threads.enter_context(one_cpu_thread(factors))
            found = module_similarity(name, factors, top_k=top_k)
            details[name] = found
            if found.inputs:
                totals.add(found)
    if totals is None or count is None:
        raise InvalidRequest("no modules and no labels: nothing to compare", code="no_inputs")
    cosine = _ratio(totals.inner, (totals.energy * totals.energy.T).sqrt())
    return Similarity(
        labels=tuple(labels) if labels is not None else tuple(str(t) for t in range(count)),
        cosine=cosine.clamp(-1.0, 1.0),
        overlap_left=_ratio(totals.left, totals.weight),
        overlap_right=_ratio(totals.right, totals.weight),
        shared_modules=totals.shared, modules=details)


def shared_module_names(adapters: Sequence[LoraAdapter]) -> list[tuple[str, tuple[int, ...]]]:
    """Every module any input has (sorted), with the inputs that have it; refuses a module
    whose delta shape differs between inputs."""
    by_module: dict[str, list[int]] = {}
    for index, adapter in enumerate(adapters):
        for name in adapter.modules:
            by_module.setdefault(name, []).append(index)
    out = []
    for name in sorted(by_module):
        inputs = by_module[name]
        first = adapters[inputs[0]].modules[name]
        for index in inputs[1:]:
            other = adapters[index].modules[name]
            if other.delta_shape != first.delta_shape:
                raise IncompatibleAdapters(
                    f"{name}: {adapters[inputs[0]].label} has a delta of shape "
                    f"{list(first.delta_shape)} but {adapters[index].label} one of shape "
                    f"{list(other.delta_shape)}; they are not for the same model",
                    code="module_shape_mismatch")
        out.append((name, tuple(inputs)))
    return out


def module_factors(adapters: Sequence[LoraAdapter], *, device: torch.device | str = "cpu",
                   ) -> Iterator[ModuleFactors]:
    """Each module's (s_t·B_t, A_t) in float32 on `device` for every input (None where an
    input lacks it), read one module at a time, as the merge reads them."""
    for name, inputs in shared_module_names(adapters):
        pairs: list[Pair | None] = [None] * len(adapters)
        for index in inputs:
            loaded = adapters[index].load(name, device=device)
            pairs[index] = (loaded.B.to(torch.float32) * loaded.scale,
                            loaded.A.to(torch.float32))
        yield name, pairs


def adapter_similarity(adapters: Sequence[LoraAdapter], *, top_k: int | None = None,
                       device: torch.device | str = "cpu") -> Similarity:
    """`factor_similarity` of opened adapters, read module by module; labelled as a merge
    labels them."""
    if not adapters:
        raise InvalidRequest("similarity needs at least one adapter", code="no_inputs")
    labels = unique_labels([a.label for a in adapters])
    return factor_similarity(module_factors(adapters, device=device), labels=labels,
                             top_k=top_k)

