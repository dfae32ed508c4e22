"""Smoke run of bench/merge_scaling.py at its --quick size (256×256, in seconds).

The timings mean nothing at this size; what is checked is that every method and both
algebras run at every point they are asked for, that the agreement figures the report
quotes are what they should be (the new algebra equals the old, core with ta equals mtc),
that the cost-model fit reproduces a model it is given, and that JSON and plot come out.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.unit.bench.bench_loader import load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("merge_scaling")


@pytest.fixture(scope="module")
def result(bench: ModuleType) -> dict[str, Any]:
    return bench.run_benchmark(bench.QUICK, "smoke")


def test_every_point_times_what_it_should(bench: ModuleType, result: dict[str, Any]) -> None:
    json.dumps(result)
    assert [(p["T"], p["r"]) for p in result["points"]] == list(bench.QUICK.points)
    for point in result["points"]:
        keys = set(point["seconds"])
        assert {"ctm-hooi/new", "ctm-hosvd/new", "core/new", "ctm-hooi/old",
                "ctm-hosvd/old", "core/old"} <= keys
        assert ("mtc/new" in keys) == ((point["T"], point["r"]) in bench.QUICK.mtc_points)
        assert all(len(runs) == bench.QUICK.reps for runs in point["runs"].values())
        assert all(s > 0 for s in point["seconds"].values())
        assert point["sweeps"]["ctm-hosvd/new"] == 0 and point["sweeps"]["ctm-hooi/new"] >= 1
    assert result["targets"] == []           # targets only at the full 4096×4096 size


def test_agreement_figures(result: dict[str, Any]) -> None:
    for point in result["points"]:
        gaps = point["agreement"]
        assert gaps["ctm-hosvd/new vs ctm-hosvd/old"] < 1e-4
        assert gaps["core/new vs core/old"] < 1e-4
        if "core/new vs mtc/new" in gaps:
            assert gaps["core/new vs mtc/new"] < 1e-5
        assert point["energy"]["ctm-hooi/new"] >= point["energy"]["ctm-hosvd/new"]


def test_the_fit_recovers_a_known_cost_model(bench: ModuleType) -> None:
    m = n = 1000
    points = [{"R": r, "seconds": {"x/new": 0.01 + 2e-11 * (m + n) * r**2 + 1e-10 * r**3}}
              for r in (64, 128, 256, 512, 1024, 2048)]
    fit = bench.fit_cost(points, "x/new", m, n)
    assert fit["a_s"] == pytest.approx(0.01, rel=1e-6)
    assert fit["b_s_per_flop_unit"] == pytest.approx(2e-11, rel=1e-6)
    assert fit["c_s_per_r3"] == pytest.approx(1e-10, rel=1e-6)
    assert fit["max_relative_error"] < 1e-6


def test_outputs_and_command_line(bench: ModuleType, result: dict[str, Any],
                                  tmp_path: Path) -> None:
    bench.write_outputs(result, tmp_path)
    assert json.loads((tmp_path / "merge_scaling.json").read_text())["command"] == "smoke"
    assert (tmp_path / "merge_scaling.png").stat().st_size > 0
    assert "| T | r | R |" in bench.render(result)
    cfg = bench.config_from(bench.parse_args(["--quick", "--reps", "2", "--core-max-r", "64"]))
    assert (cfg.m, cfg.reps, cfg.core_max_r) == (256, 2, 64)
    full = bench.config_from(bench.parse_args([]))
    assert (full.m, full.n, full.out_rank) == (4096, 4096, 16)
    assert sorted(t * r for t, r in full.points) == [128, 256, 256, 512, 512, 1024, 1024,
                                                     2048, 4096]
    assert bench.config_from(bench.parse_args(["--points", "8x256,8x512"])).points == (
        (8, 256), (8, 512))
    for bad in (["--reps", "0"], ["--points", "8by256"]):
        with pytest.raises(SystemExit):
            bench.config_from(bench.parse_args(bad))
