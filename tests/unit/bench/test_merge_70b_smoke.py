"""Smoke run of bench/merge_70b.py on two tiny layers: the harness works end to end (inputs
written and deleted, the merge in a fresh process, floor, peak RSS against the bound)."""

from __future__ import annotations

import json
from dataclasses import replace
from types import ModuleType
from typing import Any

import pytest

from tests.unit.bench.bench_loader import load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("merge_70b")


@pytest.fixture(scope="module")
def result(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cfg = replace(bench.QUICK, adapters=3, rank=4, gemm_shapes=((64, 64, 64),),
                  gemm_min_flops=1e6)
    workdir = tmp_path_factory.mktemp("bench")
    out: dict[str, Any] = bench.run_benchmark(cfg, "smoke", workdir=workdir)
    assert list(workdir.iterdir()) == []        # the temporary adapters are deleted
    return out


def test_the_merge_runs_and_reports(bench: ModuleType, result: dict[str, Any]) -> None:
    json.dumps(result)
    assert result["modules"] == 14 and result["runs"][0]["modules"] == 14
    run = result["runs"][0]
    assert run["wall_s"] > 0 and run["floor_s"] > 0 and run["ratio"] == pytest.approx(
        run["wall_s"] / run["floor_s"])
    assert run["peak_rss"] >= run["baseline_rss"] > 0 and run["output_bytes"] > 0
    assert run["cli_wall_s"] > 0 and run["cli_ratio"] == pytest.approx(   # hashing its inputs
        run["cli_wall_s"] / run["floor_s"])
    assert result["within_bound"]
    assert "end to end / floor" in bench.render(result)


def test_the_shapes_are_llama_70bs(bench: ModuleType) -> None:
    shapes = bench.ScaleConfig().module_shapes()
    assert len(shapes) == 80 * 7
    layer = {name.rsplit(".", 1)[-1]: shape for name, shape in shapes.items()
             if name.startswith("model.layers.0.")}
    assert layer == {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192),
                     "o_proj": (8192, 8192), "gate_proj": (28672, 8192),
                     "up_proj": (28672, 8192), "down_proj": (8192, 28672)}
    factor_bytes = sum(8 * 16 * (m + n) * 2 for m, n in shapes.values())
    assert 3.2e9 < factor_bytes < 3.4e9          # T = 8, r = 16, bf16


def test_memory_bound_by_hand(bench: ModuleType) -> None:
    cfg = replace(bench.QUICK, adapters=2, rank=4, allowance_bytes=0)
    bound = bench.memory_bound(cfg, baseline_rss=1000)
    widest = 896 + 256                           # gate/up: 896×256
    assert bound["three_modules_inputs"] == 3 * 2 * 4 * widest * (2 + 4)
    assert bound["three_modules_outputs"] == 3 * 4 * widest * 4
    assert bound["limit"] == 1000 + bound["three_modules_inputs"] + bound["three_modules_outputs"]

