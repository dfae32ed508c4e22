"""Smoke run of bench/merge_speed.py on one tiny layer: the whole harness works end to end.

Tiny shapes make the timings meaningless; what is checked is that every stage runs (CtM,
mtc, PEFT's add_weighted_adapter, the floor, the RSS subprocess), that the JSON holds what
the report needs, and the cheap correctness facts the benchmark reports.
"""

from __future__ import annotations

import json
from dataclasses import replace
from types import ModuleType
from typing import Any

import pytest

from tests.unit.bench.bench_loader import load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("merge_speed")


@pytest.fixture(scope="module")
def result(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cfg = replace(bench.QUICK, adapters=3, rank=4, hidden=64, intermediate=160, heads=1,
                  gemm_shapes=((160, 12, 12), (64, 64, 64)), gemm_min_flops=1e6)
    workdir = tmp_path_factory.mktemp("bench")
    out = bench.run_benchmark(cfg, "smoke", workdir=workdir)
    assert list(workdir.iterdir()) == []     # the temporary adapters are deleted
    return out


def test_every_stage_reports(result: dict[str, Any]) -> None:
    json.dumps(result)                       # JSON-ready as written by main()
    assert [row["shape"] for row in result["shapes"]] == ["64x64", "160x64", "64x160"]
    assert [row["per_layer"] for row in result["shapes"]] == [4, 2, 1]
    for row in result["shapes"]:
        assert row["ctm_ms"] > 0 and row["mtc_ms"] > 0 and row["peft_svd_ms"] > 0
        assert row["floor_ms"] > 0 and row["peft_over_ctm"] > 0 and row["mtc_over_ctm"] > 0
    assert result["peft"]["modules"] == 7    # all of layer 0, the baseline default
    assert result["ctm_end_to_end"]["median_s"] > 0
    assert result["floor"]["floor_s"] > 0 and result["floor"]["read_bytes"] > 0
    assert len(result["floor"]["runs"]) == 1 and len(result["floor"]["gemm_gflops"]) == 2
    assert result["rss"]["peak_rss"] >= result["rss"]["baseline_rss"] > 0
    assert [t["name"] for t in result["targets"]] == [
        "PEFT-svd / CtM compute, worst shape", "PEFT-svd / CtM end to end, per layer",
        "CtM end to end / floor", "CtM end to end, HOOI / HOSVD", "CtM peak RSS (bytes)"]
    run = result["floor"]["runs"][0]
    assert run["hosvd_s"] > 0 and run["hooi_over_hosvd"] == run["e2e_s"] / run["hosvd_s"]
    assert run["cli_s"] > 0 and run["cli_ratio"] == run["cli_s"] / run["floor_s"]
    assert all(t["hosvd_s"] > 0 and t["sweeps"] >= 1 for t in result["modules"])


def test_correctness_facts(result: dict[str, Any]) -> None:
    corr = result["correctness"]
    assert corr["config_r"] == 4 and corr["max_module_rank"] <= 4
    assert corr["all_module_ranks_ok"]
    # mtc and PEFT's svd are the same math: their deltas agree to float32 precision.
    assert corr["mtc_vs_peft"] < 1e-4
    assert 0 <= corr["ctm_vs_exact"] <= 1 and 0 <= corr["mtc_vs_exact"] <= corr["ctm_vs_exact"]


def test_render_has_the_table(bench: ModuleType, result: dict[str, Any]) -> None:
    text = bench.render(result)
    assert "PEFT-svd ms" in text and "64x160" in text and "floor:" in text
    assert text.count("MET") + text.count("MISSED") == 5 and "HOOI / HOSVD: end to end" in text


def test_flop_count_by_hand(bench: ModuleType) -> None:
    # m = n = 8, T = 2 inputs of rank 2 (R = 4), output rank k = 2.
    flops = bench.ctm_flops(8, 8, [2, 2], 2)
    assert flops["qr"] == pytest.approx(4 * 16 * 16 - 8 / 3 * 64)
    assert flops["cores"] == 2 * 64
    assert flops["gram"] == 4 * 2 * 64
    assert flops["eigh"] == 18 * 64
    assert flops["coordinates"] == 2 * (2 * 2 * 16 + 2 * 4 * 4)
    assert flops["bases"] == 2 * 16 * 4 * 2
    assert flops["factor_back"] == 21 * 8 + 2 * 16 * 4


def test_command_line(bench: ModuleType) -> None:
    cfg = bench.config_from(bench.parse_args(["--quick", "--layers", "2", "--baseline", "shapes"]))
    assert (cfg.layers, cfg.hidden, cfg.reps, cfg.baseline) == (2, 256, 1, "shapes")
    shapes = bench.llama_module_shapes(2)
    assert bench.baseline_modules(shapes, "shapes") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.down_proj"]
    assert len(bench.baseline_modules(shapes, "layer")) == 7
    full = bench.config_from(bench.parse_args([]))
    assert (full.adapters, full.rank, full.hidden, full.intermediate) == (8, 16, 4096, 11008)
    with pytest.raises(SystemExit):
        bench.config_from(bench.parse_args(["--layers", "0"]))
