"""The grouping planner on constructed families: adapters that share a subspace (one is a
regauged, slightly perturbed copy of the other) and adapters orthogonal to them, checked
against `auto_rank` and `captured_energies` run directly on the files."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorafold.adapters.config import PEFT_PREFIX
from lorafold.adapters.reader import LoraAdapter, LoraFactors, open_adapter
from lorafold.errors import IncompatibleAdapters, InvalidRequest
from lorafold.merge.auto_rank import auto_rank, captured_energies
from lorafold.merge.grouping import GroupPlan, plan_groups
from lorafold.merge.similarity import module_factors
from lorafold.synthetic import write_random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (32, 24), "model.layers.0.mlp.up_proj": (40, 24)}
RANK = 4
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def write_factors(directory: Path, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  *, base_model: str = "synthetic/llama") -> str:
    """A PEFT adapter (rank RANK, scale 2) whose factors are `factors` (name -> (B, A))."""
    write_random_adapter(directory, SHAPES, rank=RANK, base_model=base_model)
    tensors = {}
    for name, (b, a) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.to(torch.float32).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.to(torch.float32).contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return str(directory)


def outside(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x's columns with their components in span(basis) removed (twice, for rounding)."""
    q = torch.linalg.qr(basis)[0]
    for _ in range(2):
        x = x - q @ (q.T @ x)
    return x


def family(seed: int, *, avoid: Sequence[Factors] = (), noise: float = 0.05,
           ) -> tuple[Factors, Factors]:
    """A random adapter and a regauged copy (B G, G⁻¹ A + noise), their column and row
    spaces orthogonal to those of every adapter in `avoid`."""
    g = torch.Generator().manual_seed(seed)
    first: Factors = {}
    second: Factors = {}
    for name, (m, n) in SHAPES.items():
        b = torch.randn(m, RANK, generator=g)
        a = torch.randn(RANK, n, generator=g) / n**0.5
        for other in avoid:
            b = outside(b, other[name][0])
            a = outside(a.T, other[name][1].T).T
        gauge = torch.randn(RANK, RANK, generator=g) + 3 * torch.eye(RANK)
        jitter = noise * torch.randn(RANK, n, generator=g) / n**0.5
        perturbed = torch.linalg.solve(gauge, a) + jitter
        first[name], second[name] = (b, a), (b @ gauge, perturbed)
    return first, second


@pytest.fixture
def paths(tmp_path: Path) -> list[str]:
    """a0, a1 sharing a subspace; a2 orthogonal to both (on both sides)."""
    f0, f1 = family(0)
    lone, _ = family(1, avoid=[f0, f1])
    return [write_factors(tmp_path / f"a{i}", f) for i, f in enumerate([f0, f1, lone])]


def opened(stack: ExitStack, paths: list[str]) -> list[LoraAdapter]:
    return [stack.enter_context(open_adapter(p, label=p)) for p in paths]


@pytest.fixture
def adapters(paths: list[str]) -> Iterator[list[LoraAdapter]]:
    with ExitStack() as stack:
        yield opened(stack, paths)


def member_minima(energies: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for row in energies.values():
        for label, e in row.items():
            out[label] = min(out.get(label, 1.0), e)
    return out


def check_parameters(plan: GroupPlan, adapters: list[LoraAdapter]) -> None:
    """before: Σ r·(m+n) as the adapters count it; after: each group at its rank over the
    modules its members have, plus the left-alone ones as they are."""
    by_label = {a.label: a for a in adapters}
    assert plan.parameters_before == sum(a.summary()["parameters"] for a in adapters)
    groups = sum(g.rank * sum(s.in_features + s.out_features for s in
                              {name: spec for m in g.members
                               for name, spec in by_label[m].modules.items()}.values())
                 for g in plan.groups)
    alone = sum(by_label[label].summary()["parameters"] for label in plan.left_alone)
    assert plan.parameters_after == groups + alone


def test_the_shared_pair_is_grouped_at_its_auto_rank_and_the_orthogonal_one_left_alone(
        adapters: list[LoraAdapter], paths: list[str]) -> None:
    plan = plan_groups(adapters, energy=0.9)
    assert [g.members for g in plan.groups] == [(paths[0], paths[1])]
    assert plan.left_alone == (paths[2],)
    group = plan.groups[0]
    direct = auto_rank(adapters[:2], energy=0.9)
    assert group.rank == direct.rank <= RANK
    expected = member_minima(direct.energies)
    for member in group.energies:
        assert member.energy >= 0.9
        assert member.energy == pytest.approx(expected[member.input], abs=1e-5)
        assert direct.energies[member.module][member.input] == pytest.approx(member.energy,
                                                                             abs=1e-5)
    assert group.worst.energy == min(e.energy for e in group.energies)
    assert plan.parameters_after < plan.parameters_before
    check_parameters(plan, adapters)
    assert plan.cosine[0][1] > 0.9 and abs(plan.cosine[0][2]) < 1e-4


def test_the_orthogonal_one_is_refused_because_it_shares_no_rank(
        adapters: list[LoraAdapter], paths: list[str]) -> None:
    """Without the similarity floor, only the rank rule keeps a2 out: CtM could hold all
    three within the default cap (4 × 4), at the sum of what they need apart."""
    plan = plan_groups(adapters, min_similarity=-1.0)
    assert plan.left_alone == (paths[2],)
    (refusal,) = plan.refused
    assert (refusal.members, refusal.reason) == (tuple(paths), "no_saving")
    together = auto_rank(adapters, energy=0.9)
    alone = auto_rank(adapters[2:], energy=0.9)
    assert plan.max_rank == 4 * RANK and together.rank <= 4 * RANK
    assert together.rank >= plan.groups[0].rank + alone.rank
    assert f"need rank {together.rank}" in refusal.message


def test_a_fixed_rank_fits_every_member_at_that_rank(adapters: list[LoraAdapter],
                                                     paths: list[str]) -> None:
    at_four = plan_groups(adapters, rank=RANK, min_similarity=-1.0)
    assert [(g.members, g.rank) for g in at_four.groups] == [((paths[0], paths[1]), RANK)]
    assert at_four.left_alone == (paths[2],)
    assert [r.reason for r in at_four.refused] == ["energy"]
    # the reported energies are captured_energies on the files' own factors
    for name, pairs in module_factors(adapters[:2]):
        found = captured_energies([p for p in pairs if p is not None], [RANK])[0]
        for label, e in zip(paths[:2], found.tolist(), strict=True):
            reported = next(m for m in at_four.groups[0].energies if m.input == label)
            assert reported.energy <= e + 1e-5
            if reported.module == name:
                assert reported.energy == pytest.approx(e, abs=1e-5)
    # at rank 8 the three fit together (the left spaces add up to exactly 8 dimensions)
    at_eight = plan_groups(adapters, rank=2 * RANK, min_similarity=-1.0)
    assert [(g.members, g.rank) for g in at_eight.groups] == [(tuple(paths), 2 * RANK)]
    assert all(m.energy >= 0.9 for m in at_eight.groups[0].energies)
    assert at_eight.left_alone == ()
    check_parameters(at_eight, adapters)
    assert at_eight.parameters_after == 2 * at_eight.parameters_before // 3


def test_max_groups_is_an_upper_bound_and_says_when_it_is_not_reached(tmp_path: Path) -> None:
    p0, p1 = family(0, noise=0.01)                 # the most similar pair
    q0, q1 = family(1, avoid=[p0, p1], noise=0.3)
    paths = [write_factors(tmp_path / name, f)
             for name, f in zip(("p0", "q0", "p1", "q1"), (p0, q0, p1, q1), strict=True)]
    with ExitStack() as stack:
        adapters = opened(stack, paths)
        free = plan_groups(adapters)
        assert [g.members for g in free.groups] == [(paths[0], paths[2]), (paths[1], paths[3])]
        assert free.max_groups_reached is None and free.notes == ()
        three = plan_groups(adapters, max_groups=3)
        assert [g.members for g in three.groups] == [(paths[0], paths[2])]
        assert three.left_alone == (paths[1], paths[3])
        assert three.adapters_after == 3 and three.max_groups_reached is True
        one = plan_groups(adapters, max_groups=1)
        assert len(one.groups) == 2 and one.max_groups_reached is False
        assert any("max_groups 1 not reached" in n and "no fewer than 2" in n
                   for n in one.notes)
        assert plan_groups(adapters, max_groups=4).groups == ()   # already at most 4


@pytest.mark.parametrize("options", [{"rank": 1, "energy": 0.99}, {"max_rank": 1}])
def test_an_impossible_constraint_leaves_everyone_alone_and_says_so(
        adapters: list[LoraAdapter], paths: list[str], options: dict[str, float]) -> None:
    plan = plan_groups(adapters, **options)  # type: ignore[arg-type]
    assert plan.groups == () and plan.left_alone == tuple(paths)
    assert plan.parameters_after == plan.parameters_before
    assert plan.refused and all(r.reason in ("energy", "dissimilar") for r in plan.refused)
    assert any("every adapter is left alone" in n for n in plan.notes)


def test_opposite_deltas_are_not_folded(tmp_path: Path) -> None:
    """ΔW and −ΔW share every direction, so energy and rank allow the union; their merge
    would cancel. The similarity floor refuses it."""
    f0, _ = family(0)
    negated = {name: (-b, a) for name, (b, a) in f0.items()}
    paths = [write_factors(tmp_path / "x", f0), write_factors(tmp_path / "neg", negated)]
    with ExitStack() as stack:
        adapters = opened(stack, paths)
        plan = plan_groups(adapters)
        assert plan.groups == () and [r.reason for r in plan.refused] == ["dissimilar"]
        assert plan.cosine[0][1] == pytest.approx(-1.0)
        assert len(plan_groups(adapters, min_similarity=-1.0).groups) == 1


def test_every_module_of_every_adapter_is_read_once(adapters: list[LoraAdapter],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[str, str]] = []

    def counting(adapter: LoraAdapter) -> Callable[..., LoraFactors]:
        real = adapter.load

        def load(module: str, *, device: torch.device | str = "cpu") -> LoraFactors:
            reads.append((adapter.label, module))
            return real(module, device=device)
        return load

    for adapter in adapters:
        monkeypatch.setattr(adapter, "load", counting(adapter))
    plan = plan_groups(adapters, min_similarity=-1.0, rank=2 * RANK)
    assert plan.evaluations >= 2
    assert sorted(reads) == sorted((a.label, m) for a in adapters for m in a.modules)


def test_bad_inputs_are_refused(adapters: list[LoraAdapter], tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as e:
        plan_groups(adapters[:1])
    assert e.value.code == "too_few_inputs"
    other = open_adapter(write_random_adapter(tmp_path / "other", SHAPES, rank=RANK,
                                              base_model="someone/else"))
    with other:
        with pytest.raises(IncompatibleAdapters) as mismatch:
            plan_groups([adapters[0], other])
        assert mismatch.value.code == "base_model_mismatch"
        assert plan_groups([adapters[0], other], force=True).labels[1] == other.label
    bad_options: list[dict[str, float]] = [
        {"energy": 0.0}, {"energy": 1.5}, {"rank": 0}, {"max_groups": 0},
        {"rank": 4, "max_rank": 8}, {"max_rank": 0}, {"min_similarity": 2.0}]
    for options in bad_options:
        with pytest.raises(InvalidRequest) as bad:
            plan_groups(adapters, **options)  # type: ignore[arg-type]
        assert bad.value.code == "invalid_parameter", options
