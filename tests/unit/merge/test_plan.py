"""Requests refused before any tensor is read, and the scale reaching every method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafold.errors import InvalidRequest
from lorafold.merge import MergeRequest, check_request, merge_adapters
from lorafold.synthetic import write_random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.mlp.down_proj": (10, 14)}


@pytest.mark.parametrize(("method", "rule"), [("ctm", "iso"), ("mtc", "iso"), ("core", "iso"),
                                             ("mtc", "ta"), ("core", "ties"), ("ctm", "tsv")])
def test_every_ranked_method_takes_every_rule(method: str, rule: str) -> None:
    check_request(MergeRequest(method=method, rule=rule, rank=4), 2)


@pytest.mark.parametrize(("request_", "message"), [
    (MergeRequest(method="mtc", rank=4, beta=0.5), "beta applies to method ctm only"),
    (MergeRequest(method="core", rank=4, subspace="hooi"), "subspace applies to method ctm"),
    (MergeRequest(rank=4, beta=1.5), "beta must be in [0, 1]"),
    (MergeRequest(rank=4, beta=float("nan")), "beta must be in [0, 1]"),
    (MergeRequest(rank=4, subspace="tucker"), "subspace must be one of hooi, hosvd"),
    (MergeRequest(rank=4, rule="dare", density=0.5), "takes no density"),
    (MergeRequest(rank=4, rule="ties", drop=0.5), "takes no drop"),
])
def test_bad_ctm_and_rule_options_are_refused(request_: MergeRequest, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        check_request(request_, 2)
    assert err.value.code == "invalid_parameter"
    assert message in err.value.message


def test_lineage_parameters_write_ctm_defaults_out() -> None:
    """A re-merge from lineage must not depend on what the defaults are by then."""
    ctm = MergeRequest(rank=4).parameters()
    assert ctm["beta"] is not None and ctm["subspace"] is not None
    assert MergeRequest(method="mtc", rank=4).parameters()["beta"] is None
    dare_ties = MergeRequest(rule="dare_ties", rank=4).parameters()
    assert dare_ties["density"] is not None and dare_ties["drop"] is not None
    ta = MergeRequest(rule="ta", rank=4).parameters()
    assert ta["density"] is None and ta["drop"] is None


def dense_deltas(directory: Path) -> dict[str, torch.Tensor]:
    """Module → scale·B @ A in float64, read straight from a PEFT safetensors file."""
    settings = json.loads((directory / "adapter_config.json").read_text())
    scale = settings["lora_alpha"] / settings["r"]
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[key.split(".lora_A.")[0]] = scale * (b.double() @ a.double())
    return out


@pytest.mark.parametrize("method", ["cat", "ctm"])
def test_merge_applies_the_request_scale(tmp_path: Path, method: str) -> None:
    """merge_adapters(scale=λ) writes λ·Σ w_t ΔW_t (exact for cat, and for ctm at r = Σ r_t)."""
    inputs = [write_random_adapter(tmp_path / f"in{i}", SHAPES, rank=3, seed=i) for i in range(2)]
    weights, scale = (1.0, -0.5), 0.4
    request = MergeRequest(method=method, rule="ta", rank=6 if method == "ctm" else None,
                           weights=weights, scale=scale)
    out = merge_adapters(inputs, tmp_path / "out", request, device="cpu").out_dir
    merged = dense_deltas(out)
    parts = [dense_deltas(path) for path in inputs]
    for module, got in merged.items():
        expected = scale * sum(w * p[module] for w, p in zip(weights, parts, strict=True))
        assert isinstance(expected, torch.Tensor)
        assert float((got - expected).norm() / expected.norm()) < 1e-5
