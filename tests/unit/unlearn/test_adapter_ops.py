"""Exact removal from a merge, and negation, checked against direct computations.

Tolerance: removal runs the very same operations as a fresh merge of the remaining
adapters, so the outputs agree to 1e-6 relative (in practice bit for bit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lorafold.adapters.lineage import attach_lineage, read_lineage
from lorafold.errors import InvalidRequest
from lorafold.merge import MergeRequest, merge_adapters
from lorafold.synthetic import write_random_adapter
from lorafold.unlearn.adapter_ops import _request_from, negate_adapter, remove_constituents

SHAPES = {"model.layers.0.mlp.up_proj": (24, 16), "model.layers.0.self_attn.q_proj": (16, 16)}


def deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """B @ A straight from the file, without the config's scale (1 for lorafold outputs)."""
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {key.removesuffix(".lora_A.weight"):
            tensors[key.replace("lora_A", "lora_B")].double() @ tensors[key].double()
            for key in tensors if key.endswith("lora_A.weight")}


def assert_same_deltas(a: Path, b: Path, tol: float = 1e-6) -> None:
    da, db = deltas(a), deltas(b)
    assert da.keys() == db.keys()
    for key in da:
        assert float((da[key] - db[key]).norm() / db[key].norm()) < tol, key


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    return [write_random_adapter(tmp_path / f"in{i}", SHAPES, rank=3 + i, seed=i)
            for i in range(3)]


def by_label(paths: list[Path]) -> Any:
    table = {str(p): p for p in paths}
    return lambda entry: table[entry["label"]]


@pytest.mark.parametrize(("method", "rule"), [("ctm", "ties"), ("ctm", "dare"), ("mtc", "ta"),
                                              ("core", "ta")])
def test_remove_equals_a_fresh_merge_of_the_rest(inputs: list[Path], tmp_path: Path,
                                                 method: str, rule: str) -> None:
    request = MergeRequest(method=method, rule=rule, rank=5, weights=(1.0, 0.5, -0.8), seed=11)
    merged = merge_adapters(inputs, tmp_path / "merged", request).out_dir
    removed = remove_constituents(merged, [str(inputs[1])], tmp_path / "removed",
                                  resolve=by_label(inputs))
    fresh = merge_adapters([inputs[0], inputs[2]], tmp_path / "fresh",
                           MergeRequest(method=method, rule=rule, rank=5, weights=(1.0, -0.8),
                                        seed=11)).out_dir
    assert_same_deltas(removed.out_dir, fresh)
    assert removed.lineage["removed_from"]["removed"] == [str(inputs[1])]
    assert [e["label"] for e in removed.lineage["inputs"]] == [str(inputs[0]), str(inputs[2])]


REQUESTS_WITH_NEW_OPTIONS = [
    MergeRequest(method="ctm", rule="dare_ties", rank=5, weights=(1.0, 0.5, -0.8), seed=11,
                 density=0.6, drop=0.2, beta=0.25, subspace="hosvd"),
    MergeRequest(method="ctm", rule="dare", rank=5, weights=(1.0, 0.5, -0.8), seed=11,
                 drop=0.4, beta=0.0),
    MergeRequest(method="ctm", rule="tsv", rank=5, weights=(1.0, 0.5, -0.8), subspace="hooi"),
    MergeRequest(method="mtc", rule="iso", rank=5, weights=(1.0, 0.5, -0.8)),
    MergeRequest(method="core", rule="dare_ties", rank=5, weights=(1.0, 0.5, -0.8), seed=3,
                 drop=0.1, density=0.7),
]


@pytest.mark.parametrize("request_", REQUESTS_WITH_NEW_OPTIONS,
                         ids=lambda r: f"{r.method}-{r.rule}")
def test_remove_is_exact_with_beta_subspace_and_drop(inputs: list[Path], tmp_path: Path,
                                                     request_: MergeRequest) -> None:
    merged = merge_adapters(inputs, tmp_path / "merged", request_)
    removed = remove_constituents(merged.out_dir, [str(inputs[1])], tmp_path / "removed",
                                  resolve=by_label(inputs))
    rest = dataclasses.replace(request_, weights=(1.0, -0.8))
    fresh = merge_adapters([inputs[0], inputs[2]], tmp_path / "fresh", rest).out_dir
    assert_same_deltas(removed.out_dir, fresh)
    recorded = {k: v for k, v in removed.lineage["parameters"].items() if k != "output_rank"}
    assert recorded == rest.parameters()


def test_request_from_new_lineage_is_the_request() -> None:
    for request in [*REQUESTS_WITH_NEW_OPTIONS, MergeRequest(method="ctm", rank=4),
                    MergeRequest(method="cat")]:
        weights = request.weights or (1.0,)
        rebuilt = _request_from({**request.parameters(), "output_rank": 5}, weights)
        assert rebuilt.parameters() == request.parameters()
        assert (rebuilt.weights, rebuilt.force) == (tuple(weights), True)


def old_parameters(**changes: object) -> dict[str, object]:
    """`parameters` as lineage recorded them before beta, subspace and drop existed."""
    return {"method": "ctm", "rule": "ta", "rank": 4, "density": None, "scale": 1.0,
            "seed": 0, "balance": False, "dtype": None, "output_rank": 4, **changes}


@pytest.mark.parametrize(("old", "expected"), [
    (old_parameters(), dict(beta=1.0, subspace="hosvd")),
    (old_parameters(balance=True), dict(beta=0.0, subspace="hosvd")),
    ({k: v for k, v in old_parameters().items() if k != "balance"},
     dict(beta=1.0, subspace="hosvd")),
    (old_parameters(rule="dare", density=0.75, seed=7),
     dict(beta=1.0, subspace="hosvd", density=None, drop=0.25, seed=7)),
    (old_parameters(rule="dare"), dict(beta=1.0, subspace="hosvd", density=None, drop=0.5)),
    (old_parameters(rule="dare_ties", density=0.75, balance=True),
     dict(beta=0.0, subspace="hosvd", density=1.0, drop=0.25)),
    (old_parameters(rule="ties", density=0.3), dict(beta=1.0, subspace="hosvd", density=0.3)),
    (old_parameters(method="mtc", rule="dare", density=0.6),
     dict(beta=None, subspace=None, density=None, drop=pytest.approx(0.4))),
    (old_parameters(method="cat", rank=None), dict(beta=None, subspace=None, rank=None)),
])
def test_request_from_old_lineage(old: dict[str, object], expected: dict[str, object]) -> None:
    request = _request_from(old, [1.0, -0.5])
    base = dict(method=old["method"], rule=old["rule"], rank=old["rank"], density=old["density"],
                drop=None, scale=1.0, seed=0, dtype=None, weights=(1.0, -0.5), force=True)
    for key, value in {**base, **expected}.items():
        assert getattr(request, key) == value, key


def test_remove_from_an_old_lineage_is_exact(inputs: list[Path], tmp_path: Path) -> None:
    """A merge whose lineage predates beta/subspace/drop (balance, dare's keep density)."""
    merged = merge_adapters(inputs, tmp_path / "merged", MergeRequest(
        method="ctm", rule="dare", rank=5, weights=(1.0, 0.5, -0.8), seed=11, drop=1.0 - 0.75,
        beta=0.0, subspace="hosvd")).out_dir
    lineage = read_lineage(merged)
    assert lineage is not None
    lineage["parameters"] = old_parameters(rule="dare", rank=5, density=0.75, seed=11,
                                           balance=True, output_rank=5)
    attach_lineage(merged, lineage)
    removed = remove_constituents(merged, [str(inputs[1])], tmp_path / "removed",
                                  resolve=by_label(inputs))
    fresh = merge_adapters([inputs[0], inputs[2]], tmp_path / "fresh", MergeRequest(
        method="ctm", rule="dare", rank=5, weights=(1.0, -0.8), seed=11, drop=1.0 - 0.75,
        beta=0.0, subspace="hosvd")).out_dir
    assert_same_deltas(removed.out_dir, fresh)
    parameters = removed.lineage["parameters"]
    assert (parameters["beta"], parameters["subspace"], parameters["drop"],
            parameters["density"]) == (0.0, "hosvd", 0.25, None)
    assert "balance" not in parameters


def test_remove_by_sha256(inputs: list[Path], tmp_path: Path) -> None:
    result = merge_adapters(inputs, tmp_path / "merged", MergeRequest(method="ctm", rank=4))
    sha = result.lineage["inputs"][0]["sha256"]
    removed = remove_constituents(result.out_dir, [sha], tmp_path / "r", resolve=by_label(inputs))
    assert sha not in {e["sha256"] for e in removed.lineage["inputs"]}


def test_remove_refusals(inputs: list[Path], tmp_path: Path) -> None:
    merged = merge_adapters(inputs, tmp_path / "merged", MergeRequest(method="ctm", rank=4))
    out = tmp_path / "out"
    cases: Mapping[str, tuple[Path, list[str]]] = {
        "no_lineage": (inputs[0], [str(inputs[1])]),
        "not_a_constituent": (merged.out_dir, ["adapter-that-is-not-there"]),
        "nothing_left": (merged.out_dir, [str(p) for p in inputs]),
        "nothing_to_remove": (merged.out_dir, []),
    }
    for code, (source, remove) in cases.items():
        with pytest.raises(InvalidRequest) as err:
            remove_constituents(source, remove, out, resolve=by_label(inputs))
        assert err.value.code == code
        assert not out.exists()


def test_remove_refuses_a_changed_constituent(inputs: list[Path], tmp_path: Path) -> None:
    merged = merge_adapters(inputs, tmp_path / "merged", MergeRequest(method="ctm", rank=4))
    write_random_adapter(inputs[2], SHAPES, rank=5, seed=99)  # overwritten since the merge
    with pytest.raises(InvalidRequest) as err:
        remove_constituents(merged.out_dir, [str(inputs[0])], tmp_path / "out",
                            resolve=by_label(inputs))
    assert err.value.code == "lineage_mismatch"
    assert not (tmp_path / "out").exists()


def test_negate_matches_the_dense_difference(inputs: list[Path], tmp_path: Path) -> None:
    target, forget = inputs[0], inputs[1]
    exact = negate_adapter(target, forget, tmp_path / "exact", strength=0.7, rank=7).out_dir
    synthetic_scale = 2.0  # write_random_adapter uses lora_alpha = 2r
    dense_target = {k: v * synthetic_scale for k, v in deltas(target).items()}
    dense_forget = {k: v * synthetic_scale for k, v in deltas(forget).items()}
    for key, got in deltas(exact).items():
        expected = dense_target[key] - 0.7 * dense_forget[key]
        assert float((got - expected).norm() / expected.norm()) < 1e-5
    compressed = negate_adapter(target, forget, tmp_path / "low", strength=1.0)
    assert compressed.lineage["kind"] == "negate"
    assert compressed.lineage["parameters"]["output_rank"] == 3  # the target's r
    for got in deltas(compressed.out_dir).values():
        assert int(torch.linalg.matrix_rank(got)) <= 3


def test_negate_rejects_a_non_positive_strength(inputs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        negate_adapter(inputs[0], inputs[1], tmp_path / "o", strength=0.0)
