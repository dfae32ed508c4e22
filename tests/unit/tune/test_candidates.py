"""Candidate merges from the cached core space equal what the merge engine writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafold.adapters import open_adapter
from lorafold.merge import MergeRequest, merge_adapters, plan_merge
from lorafold.synthetic import write_random_adapter
from lorafold.tune.candidates import CandidateSpace

SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.1.mlp.down_proj": (16, 40)}


def _deltas(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: b @ a for name, (b, a) in factors.items()}


def _written(path: Path) -> dict[str, torch.Tensor]:
    with open_adapter(path) as adapter:
        return {name: adapter.load(name).scale * adapter.load(name).B.float()
                @ adapter.load(name).A.float() for name in adapter.modules}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("candidates")
    return [write_random_adapter(root / f"a{t}", SHAPES, rank=4, seed=t) for t in range(3)]


CASES = [
    (MergeRequest(method="ctm", rule="iso", rank=6), {"lambda": 0.7, "beta": 0.5}),
    (MergeRequest(method="ctm", rule="ties", rank=6), {"lambda": 1.5, "beta": 1.0,
                                                       "density": 0.4}),
    (MergeRequest(method="ctm", rule="dare_ties", rank=6, seed=3),
     {"lambda": 0.5, "density": 0.6, "drop": 0.2}),
    (MergeRequest(method="core", rule="ta", rank=5), {"lambda": 0.3}),
    (MergeRequest(method="mtc", rule="ties", rank=5), {"lambda": 0.8, "density": 0.8}),
    (MergeRequest(method="cat"), {"lambda": 2.0}),
]


@pytest.mark.parametrize(("request_", "point"), CASES,
                         ids=[f"{r.method}-{r.rule_name}" for r, _ in CASES])
def test_a_candidate_is_the_engines_merge_at_its_values(
        inputs: list[Path], tmp_path: Path, request_: MergeRequest,
        point: dict[str, float]) -> None:
    weights = (1.0, 0.5, 0.8)
    request = MergeRequest(**{**request_.__dict__, "weights": weights})
    adapters = [open_adapter(p, label=p.name) for p in inputs]
    try:
        space = CandidateSpace(plan_merge(adapters, request), adapters, torch.device("cpu"))
        space.merged({"lambda": 1.0})  # other candidates first: the caches must not leak
        got = _deltas(space.merged(point))
        names = {"lambda": "scale", "beta": "beta", "density": "density", "drop": "drop"}
        engine = MergeRequest(**{**request.__dict__,
                                 **{names[k]: v for k, v in point.items()}})
        want = _written(merge_adapters(adapters, tmp_path / "out", engine,
                                       device="cpu").out_dir)
    finally:
        for adapter in adapters:
            adapter.close()
    assert got.keys() == want.keys()
    for name, delta in want.items():
        torch.testing.assert_close(got[name], delta, rtol=1e-4, atol=1e-5)


def test_linear_views_give_the_ta_merge_for_any_weights(inputs: list[Path],
                                                        tmp_path: Path) -> None:
    """For fixed subspaces B_out (Σ w_t C_t) A_out is ctm + ta at those weights."""
    request = MergeRequest(method="ctm", rule="ta", rank=6, beta=0.0)
    adapters = [open_adapter(p, label=p.name) for p in inputs]
    try:
        space = CandidateSpace(plan_merge(adapters, request), adapters, torch.device("cpu"))
        views = space.linear_views(0.0, (1.0, 1.0, 1.0))
        weights = (0.3, -0.2, 1.4)
        engine = MergeRequest(method="ctm", rule="ta", rank=6, beta=0.0, weights=weights)
        want = _written(merge_adapters(adapters, tmp_path / "out", engine,
                                       device="cpu").out_dir)
    finally:
        for adapter in adapters:
            adapter.close()
    for view in views:
        w = torch.tensor([weights[i] for i in view.inputs])
        middle = torch.einsum("t,tij->ij", w, view.coordinates)
        torch.testing.assert_close(view.b_out @ middle @ view.a_out, want[view.spec.name],
                                   rtol=1e-4, atol=1e-5)
