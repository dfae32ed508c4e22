"""Automatic rank against brute force: the real CtM merge at every rank, energies computed
densely from the merged adapter (every ΔW_t formed; small modules only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from lorafold.adapters.reader import open_adapter
from lorafold.errors import InvalidRequest
from lorafold.merge.auto_rank import auto_rank, auto_rank_factors, captured_energies
from lorafold.merge.methods import METHODS, MethodInput
from lorafold.merge.rules import RULES, RuleParams
from lorafold.merge.similarity import Pair
from lorafold.synthetic import write_random_adapter

Modules = list[tuple[str, list[Pair | None]]]


def trained_like(shape: tuple[int, int], ranks: Sequence[int], seed: int) -> list[Pair]:
    """Decaying spectra, norms spread over 6×."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    out = []
    for t, r in enumerate(ranks):
        decay = torch.logspace(0, -1.5, r)
        out.append((torch.randn(m, r, generator=g) * decay * (1 + 5 * t / max(len(ranks) - 1, 1)),
                    torch.randn(r, n, generator=g)))
    return out


def ta(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return RULES["ta"].fn(stack, weights, RuleParams(), None)


def dense_energies(pairs: list[Pair], rank: int, subspace: str) -> list[float]:
    """‖Uᵀ ΔW_t V‖²/‖ΔW_t‖² with U, V the column and row spaces of the ctm merge at `rank`
    (default β), from the dense merged delta."""
    out = METHODS["ctm"].fn(MethodInput(
        factors=pairs, weights=torch.ones(len(pairs), dtype=torch.float64), rank=rank,
        rule=ta, subspace=subspace))
    merged = out.b.double() @ out.a.double()
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    k = int((s > s[0] * 1e-6).sum())
    big_r = sum(b.shape[1] for b, _ in pairs)
    assert k == min(rank, big_r, *merged.shape), "the ta merge lost a direction of U_r, V_r"
    u, v = u[:, :k], vh[:k].T
    return [float((u.T @ (b.double() @ a.double()) @ v).pow(2).sum()
                  / (b.double() @ a.double()).pow(2).sum()) for b, a in pairs]


def dense_curves(modules: Modules, subspace: str, cap: int) -> dict[str, list[list[float]]]:
    """module -> rank - 1 -> energies of the inputs that have the module."""
    return {name: [dense_energies([p for p in pairs if p is not None], r, subspace)
                   for r in range(1, cap + 1)] for name, pairs in modules}


def brute_force(curves: dict[str, list[list[float]]], energy: float) -> int | None:
    cap = len(next(iter(curves.values())))
    for r in range(1, cap + 1):
        if all(min(curve[r - 1]) >= energy for curve in curves.values()):
            return r
    return None


def cap_of(modules: Modules) -> int:
    return max(min(sum(p[0].shape[1] for p in pairs if p is not None), *next(
        p for p in pairs if p is not None)[0].shape[:1], next(
        p for p in pairs if p is not None)[1].shape[1]) for _, pairs in modules)


def case(index: int) -> Modules:
    if index == 0:
        return [("m.a", list(trained_like((24, 20), (2, 3, 4), seed=0))),
                ("m.b", list(trained_like((18, 22), (3, 3, 2), seed=1)))]
    pairs = trained_like((20, 26), (3, 2, 4, 2), seed=2)
    missing: list[Pair | None] = [pairs[0], None, pairs[2], pairs[3]]
    return [("m.a", list(trained_like((16, 16), (2, 2, 3, 1), seed=3))), ("m.b", missing),
            ("m.c", list(trained_like((22, 14), (4, 1, 2, 3), seed=4)))]


ENERGIES = [0.3, 0.6, 0.8, 0.9, 0.95, 0.99]


@pytest.mark.parametrize("subspace", ["hooi", "hosvd"])
@pytest.mark.parametrize("index", [0, 1])
def test_auto_rank_is_the_brute_force_smallest_rank(index: int, subspace: str) -> None:
    modules = case(index)
    cap = cap_of(modules)
    curves = dense_curves(modules, subspace, cap)
    values = [e for curve in curves.values() for row in curve for e in row]
    for energy in ENERGIES:
        # a dense energy within float32 noise of the target would make the comparison moot
        assert min(abs(e - energy) for e in values) > 1e-5
        expected = brute_force(curves, energy)
        assert expected is not None
        found = auto_rank_factors(modules, energy=energy, subspace=subspace)
        assert found.rank == expected, energy
        assert found.cap == cap and found.lower_bound <= found.rank
        for name, pairs in modules:
            inputs = [str(t) for t, p in enumerate(pairs) if p is not None]
            assert list(found.energies[name]) == inputs
            got = list(found.energies[name].values())
            assert got == pytest.approx(curves[name][found.rank - 1], abs=1e-5)
        assert found.worst_energy >= energy
        assert found.worst_energy == min(e for row in found.energies.values()
                                         for e in row.values())


@pytest.mark.parametrize("subspace", ["hooi", "hosvd"])
def test_auto_rank_is_monotone_in_the_energy(subspace: str) -> None:
    modules = case(1)
    ranks = [auto_rank_factors(modules, energy=e, subspace=subspace).rank
             for e in torch.linspace(0.2, 0.999, 17).tolist()]
    assert ranks == sorted(ranks)
    assert len(set(ranks)) >= 4


def spread_curve(pairs: list[Pair], subspace: str) -> torch.Tensor:
    """rank - 1 -> each input's captured energy, for every rank up to Σ r_t."""
    return captured_energies(pairs, range(1, sum(b.shape[1] for b, _ in pairs) + 1),
                             subspace=subspace)


def test_hosvd_energies_are_monotone_in_the_rank() -> None:
    """HOSVD's subspaces are nested, so no input's energy falls as the rank grows."""
    for seed in range(6):
        pairs = trained_like((24, 20), (2, 3, 4, 1, 2), seed=10 + seed)
        curve = spread_curve(pairs, "hosvd")
        assert bool((curve[1:] >= curve[:-1] - 1e-12).all())
        assert float(curve[-1].min()) == pytest.approx(1.0, abs=1e-9)


def dip_module() -> list[Pair]:
    """A stack where HOOI's smallest per-input energy falls from rank 4 to 5 (found by a
    search over random stacks)."""
    g = torch.Generator().manual_seed(1189)
    out = []
    for t, r in enumerate((2, 3, 4, 1, 2, 3)):
        decay = torch.logspace(0, -1.5, r)
        out.append((torch.randn(24, r, generator=g) * decay * (1 + 5 * t),
                    torch.randn(r, 20, generator=g)))
    return out


def steady_module() -> list[Pair]:
    """One input whose best rank-4 approximation keeps < 0.1 of it and rank 5 ≥ 0.1."""
    g = torch.Generator().manual_seed(5)
    u = torch.linalg.qr(torch.randn(56, 50, generator=g))[0]
    v = torch.linalg.qr(torch.randn(52, 50, generator=g))[0]
    sigma = torch.linspace(1.2, 0.8, 50).sqrt()
    return [(u * sigma, v.T)]


def test_hooi_energies_are_not_monotone_and_the_scan_handles_it() -> None:
    """Per module, the ranks where every input keeps E = 0.1 are {4} ∪ [6, …] (dip) and
    [5, …] (steady): the answer is 6, not the larger of the two first passes (5)."""
    dip, steady = dip_module(), steady_module()
    curve = spread_curve(dip, "hooi").min(dim=1).values
    assert float(curve[3]) > 0.11 and float(curve[4]) < 0.09 and float(curve[5:].min()) > 0.11, \
        "the HOOI counterexample no longer dips; the scan may still be right, the case is not"
    assert bool((spread_curve(dip, "hosvd").diff(dim=0) >= -1e-12).all())
    share = (torch.linspace(1.2, 0.8, 50).cumsum(0) / torch.linspace(1.2, 0.8, 50).sum())
    assert float(share[3]) < 0.1 <= float(share[4])
    modules: Modules = [("dip", [*dip, None]), ("steady", [None] * 6 + steady)]
    found = auto_rank_factors(modules, energy=0.1)
    curves = dense_curves([("dip", list(dip))], "hooi", 7)      # the answer is 6: enough
    curves["steady"] = [dense_energies(steady, r, "hooi") for r in range(1, 8)]
    assert found.rank == brute_force(curves, 0.1) == 6
    assert found.lower_bound == 5


def test_a_zero_delta_keeps_everything_and_takes_no_rank() -> None:
    modules = case(0)
    zero = (torch.zeros(24, 3), torch.randn(3, 20))
    with_zero: Modules = [(name, [*pairs, zero if name == "m.a" else None])
                          for name, pairs in modules]
    for energy in (0.6, 0.95):
        found = auto_rank_factors(with_zero, energy=energy)
        assert found.rank == auto_rank_factors(modules, energy=energy).rank
        assert found.energies["m.a"]["3"] == 1.0 and "3" not in found.energies["m.b"]


def test_unreachable_below_the_best_approximation_is_refused() -> None:
    modules = case(0)
    with pytest.raises(InvalidRequest) as err:
        auto_rank_factors(modules, energy=0.99, cap=1)
    assert err.value.code == "rank_unreachable"
    details = err.value.details
    assert details["module"] in ("m.a", "m.b") and details["input"] in ("0", "1", "2")
    assert details["energy"] < 0.99 and details["cap"] == 1
    pairs = [p for p in dict(modules)[details["module"]] if p is not None]
    energies = dense_energies(pairs, 1, "hooi")
    assert details["energy"] == pytest.approx(min(energies), abs=1e-5)
    assert details["input"] == str(energies.index(min(energies)))
    assert "that needs rank ≥" in err.value.message


def test_unreachable_by_the_shared_subspaces_is_refused() -> None:
    """Two rank-2 inputs in orthogonal subspaces: each alone fits in rank 2, both need 4."""
    g = torch.Generator().manual_seed(6)
    u = torch.linalg.qr(torch.randn(20, 4, generator=g))[0]
    v = torch.linalg.qr(torch.randn(18, 4, generator=g))[0]
    sigma = torch.tensor([1.0, 0.9])
    pairs = [(u[:, :2] * sigma, v[:, :2].T), (u[:, 2:] * sigma * 3, v[:, 2:].T)]
    modules: Modules = [("m", list(pairs))]
    with pytest.raises(InvalidRequest) as err:
        auto_rank_factors(modules, energy=0.9, cap=2)
    assert err.value.code == "rank_unreachable"
    assert err.value.details["module"] == "m"
    assert err.value.details["energy"] < 0.9
    assert err.value.details["input"] in ("0", "1")
    assert f"in m, {err.value.details['input']} keeps" in err.value.message
    assert "at rank 2" in err.value.message
    assert auto_rank_factors(modules, energy=0.9).rank == 4


@pytest.mark.parametrize(("options", "message"), [
    ({"energy": 0.0}, "energy must be in (0, 1]"), ({"energy": 1.5}, "energy must be in"),
    ({"energy": float("nan")}, "energy must be in"), ({"cap": 0}, "rank cap must be"),
    ({"beta": 2.0}, "beta must be"), ({"subspace": "tucker"}, "subspace must be one of"),
])
def test_bad_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        auto_rank_factors(case(0), **options)  # type: ignore[arg-type]
    assert err.value.code == "invalid_parameter" and message in err.value.message


def test_adapters_match_their_factors(tmp_path: Path) -> None:
    shapes = {"m.a": (20, 16), "m.b": (12, 18)}
    dirs = [write_random_adapter(tmp_path / "a", shapes, rank=3, alpha=6, seed=0),
            write_random_adapter(tmp_path / "b", shapes, rank=4, alpha=32, seed=1),
            write_random_adapter(tmp_path / "c", {"m.a": (20, 16)}, rank=2, alpha=2, seed=2)]
    adapters = [open_adapter(d, label=d.name) for d in dirs]
    try:
        found = auto_rank(adapters, energy=0.8)
        modules: Modules = []
        for key in sorted(adapters[0].modules):
            pairs: list[Pair | None] = []
            for adapter in adapters:
                f = adapter.load(key) if key in adapter.modules else None
                pairs.append(None if f is None else (f.B * f.scale, f.A))
            modules.append((key, pairs))
    finally:
        for adapter in adapters:
            adapter.close()
    expected = auto_rank_factors(modules, labels=["a", "b", "c"], energy=0.8)
    assert found.rank == expected.rank
    assert found.energies == expected.energies
    assert set(found.energies[next(k for k in found.energies if k.endswith("m.b"))]) == {"a", "b"}
