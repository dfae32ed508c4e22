"""Similarity from factors against dense references (every ΔW_t formed, small modules)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafold.adapters.reader import open_adapter
from lorafold.errors import IncompatibleAdapters
from lorafold.merge.similarity import (
    Pair,
    adapter_similarity,
    factor_similarity,
    module_similarity,
)
from lorafold.synthetic import write_random_adapter

SHAPES = {"m.a": (24, 20), "m.b": (18, 30), "m.c": (16, 16)}


def random_pairs(shape: tuple[int, int], ranks: tuple[int, ...], seed: int) -> list[Pair]:
    """Factors with decaying spectra and norms spread over 10×."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    out = []
    for t, r in enumerate(ranks):
        decay = torch.logspace(0, -1, r)
        out.append((torch.randn(m, r, generator=g) * decay * (1 + 3 * t),
                    torch.randn(r, n, generator=g) / n**0.5))
    return out


def regauged(pairs: list[Pair], seed: int) -> list[Pair]:
    """(B G, G⁻¹ A) with a random G of condition number about 10³."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, a in pairs:
        r = b.shape[1]
        q1 = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
        q2 = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
        gauge = q1 @ torch.diag(torch.logspace(-1.5, 1.5, r, dtype=torch.float64)) @ q2
        out.append(((b.double() @ gauge).float(), (torch.linalg.inv(gauge) @ a.double()).float()))
    return out


def dense(pair: Pair) -> torch.Tensor:
    return pair[0].double() @ pair[1].double()


def dense_top(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :k], vh[:k].T


def test_inner_products_equal_the_dense_ones() -> None:
    pairs = random_pairs((24, 20), (3, 5, 2, 4), seed=0)
    found = module_similarity("m", pairs)
    deltas = [dense(p) for p in pairs]
    expected = torch.tensor([[float((x * y).sum()) for y in deltas] for x in deltas],
                            dtype=torch.float64)
    torch.testing.assert_close(found.inner, expected, rtol=1e-6, atol=0)
    norms = torch.stack([x.norm() for x in deltas])
    torch.testing.assert_close(found.norms, norms, rtol=1e-6, atol=0)
    torch.testing.assert_close(found.cosine, expected / torch.outer(norms, norms),
                               rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("top_k", [None, 1, 2, 4])
def test_overlaps_equal_the_dense_singular_subspaces(top_k: int | None) -> None:
    ranks = (3, 5, 2, 4)
    pairs = random_pairs((24, 20), ranks, seed=1)
    found = module_similarity("m", pairs, top_k=top_k)
    ks = [r if top_k is None else min(r, top_k) for r in ranks]
    assert found.ranks == tuple(ks)
    tops = [dense_top(dense(p), k) for p, k in zip(pairs, ks, strict=True)]
    for side, got in ((0, found.overlap_left), (1, found.overlap_right)):
        expected = torch.tensor([[float((x[side].T @ y[side]).pow(2).sum()) / min(ki, kj)
                                  for y, kj in zip(tops, ks, strict=True)]
                                 for x, ki in zip(tops, ks, strict=True)], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_aggregate_is_the_cosine_of_the_concatenated_shared_deltas() -> None:
    """Inputs 0 and 1 have every module, input 2 only m.a and m.c: each pair is compared
    over the modules it shares, weighted by energy."""
    per_module = {name: random_pairs(shape, (3, 4, 2), seed=i)
                  for i, (name, shape) in enumerate(SHAPES.items())}
    modules: list[tuple[str, list[Pair | None]]] = [
        (name, [pairs[0], pairs[1], pairs[2] if name != "m.b" else None])
        for name, pairs in per_module.items()]
    found = factor_similarity(modules, labels=["x", "y", "z"])
    flat = {t: {name: dense(pairs[t]).flatten() for name, pairs in per_module.items()}
            for t in range(3)}
    for i in range(3):
        for j in range(3):
            shared = [name for name in SHAPES if name != "m.b" or 2 not in (i, j)]
            x = torch.cat([flat[i][name] for name in shared])
            y = torch.cat([flat[j][name] for name in shared])
            assert float(found.cosine[i, j]) == pytest.approx(
                float(x @ y / (x.norm() * y.norm())), abs=1e-6)
            assert int(found.shared_modules[i, j]) == len(shared)
            weights = torch.tensor([float(flat[i][n].norm() * flat[j][n].norm())
                                    for n in shared], dtype=torch.float64)
            rows = [found.modules[n] for n in shared]
            overlaps = torch.tensor([float(r.overlap_left[r.inputs.index(i), r.inputs.index(j)])
                                     for r in rows], dtype=torch.float64)
            assert float(found.overlap_left[i, j]) == pytest.approx(
                float((weights * overlaps).sum() / weights.sum()), abs=1e-9)
    assert found.modules["m.b"].inputs == (0, 1)


@pytest.mark.parametrize("top_k", [None, 2])
def test_unchanged_under_random_gauge_transforms(top_k: int | None) -> None:
    modules = [(name, random_pairs(shape, (3, 5, 4), seed=i))
               for i, (name, shape) in enumerate(SHAPES.items())]
    before = factor_similarity(modules, top_k=top_k)
    after = factor_similarity([(name, regauged(pairs, seed=7 + i))
                               for i, (name, pairs) in enumerate(modules)], top_k=top_k)
    for field in ("cosine", "overlap_left", "overlap_right"):
        torch.testing.assert_close(getattr(after, field), getattr(before, field),
                                   rtol=0, atol=1e-5)
    # the gauge does change the factors: the test would see a basis-dependent measure
    b0, b1 = modules[0][1][0][0], regauged(modules[0][1], seed=7)[0][0]
    assert float((b0 - b1).norm()) > 1.0


def test_constructed_shared_and_orthogonal_subspaces() -> None:
    """x and y live in the same column and row subspaces (different cores); 3·x is x
    rescaled; z is orthogonal to both on both sides."""
    g = torch.Generator().manual_seed(3)
    m, n, r = 40, 36, 4
    basis_m = torch.linalg.qr(torch.randn(m, 2 * r, generator=g))[0]
    basis_n = torch.linalg.qr(torch.randn(n, 2 * r, generator=g))[0]
    u, v = basis_m[:, :r], basis_n[:, :r]
    core_x = torch.randn(r, r, generator=g)
    core_y = torch.randn(r, r, generator=g)
    x = (u @ core_x, v.T)
    y = (u @ torch.randn(r, r, generator=g), torch.randn(r, r, generator=g) @ core_y @ v.T)
    z = (basis_m[:, r:] @ torch.randn(r, r, generator=g), basis_n[:, r:].T)
    found = factor_similarity([("m", [x, y, z, (3 * x[0], x[1])])])
    for overlap in (found.overlap_left, found.overlap_right):
        assert float(overlap[0, 1]) == pytest.approx(1.0, abs=1e-6)
        assert float(overlap[0, 2]) == pytest.approx(0.0, abs=1e-6)
        assert float(overlap[1, 2]) == pytest.approx(0.0, abs=1e-6)
    assert float(found.cosine[0, 3]) == pytest.approx(1.0, abs=1e-6)
    assert abs(float(found.cosine[0, 2])) < 1e-6 and abs(float(found.cosine[1, 2])) < 1e-6
    assert abs(float(found.cosine[0, 1])) < 0.9       # same subspaces, different deltas
    torch.testing.assert_close(found.cosine, found.cosine.T)


def test_a_zero_delta_is_similar_to_nothing() -> None:
    pairs = random_pairs((16, 12), (3, 2), seed=4)
    zero = (torch.zeros(16, 3), torch.randn(3, 12))
    found = factor_similarity([("m", [*pairs, zero])])
    assert float(found.cosine[2].abs().max()) == 0.0
    assert float(found.overlap[2].abs().max()) == 0.0
    assert found.modules["m"].ranks[2] == 0


def test_adapters_are_read_module_by_module_with_their_scales(tmp_path: Path) -> None:
    small = {k: v for k, v in SHAPES.items() if k != "m.b"}
    dirs = [write_random_adapter(tmp_path / "a", SHAPES, rank=4, alpha=8, seed=0),
            write_random_adapter(tmp_path / "b", SHAPES, rank=3, alpha=12, seed=1),
            write_random_adapter(tmp_path / "c", small, rank=2, alpha=1, seed=2)]
    adapters = [open_adapter(d, label=d.name) for d in dirs]
    try:
        found = adapter_similarity(adapters)
        modules = []
        for key in adapters[0].modules:
            pairs: list[Pair | None] = []
            for adapter in adapters:
                if key in adapter.modules:
                    f = adapter.load(key)
                    pairs.append((f.B * f.scale, f.A))
                else:
                    pairs.append(None)
            modules.append((key, pairs))
        expected = factor_similarity(modules, labels=["a", "b", "c"])
    finally:
        for adapter in adapters:
            adapter.close()
    assert found.labels == ("a", "b", "c")
    torch.testing.assert_close(found.cosine, expected.cosine, rtol=0, atol=1e-12)
    torch.testing.assert_close(found.overlap, expected.overlap, rtol=0, atol=1e-12)
    assert found.shared_modules.tolist() == [[3, 3, 2], [3, 3, 2], [2, 2, 2]]
    # scales count: the inner products are those of s_t·B_t·A_t
    name = next(k for k in found.modules if k.endswith("m.a"))
    assert float(found.modules[name].norms[2]) == pytest.approx(
        float(expected.modules[name].norms[2]), rel=1e-12)


def test_modules_of_different_shapes_are_refused(tmp_path: Path) -> None:
    a = write_random_adapter(tmp_path / "a", {"m.a": (8, 6)}, rank=2)
    b = write_random_adapter(tmp_path / "b", {"m.a": (6, 8)}, rank=2)
    with open_adapter(a) as x, open_adapter(b) as y, pytest.raises(IncompatibleAdapters) as err:
        adapter_similarity([x, y])
    assert err.value.code == "module_shape_mismatch"
