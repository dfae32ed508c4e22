"""Smoke run of bench/unlearn_quality.py on its --quick world: the harness is sane.

20 entities (forget 2, holdout 2 + 2), 2 seeds, every method capped at 5 steps: too small
to say anything about the methods, enough to check that every row is produced and that
the reference rows sit where they must (gold seeds agree, the original remembers, the base
model alone knows neither the forget nor the retain facts).
"""

from __future__ import annotations

import dataclasses
import json
from types import ModuleType
from typing import Any

import pytest

from lorafold.unlearn import METHODS, resolve_hyperparams
from tests.unit.bench.bench_loader import load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("unlearn_quality")


@pytest.fixture(scope="module")
def result(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return bench.run_benchmark(bench.QUICK, "smoke", workdir=tmp_path_factory.mktemp("uq"))


def rows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["row"]: row for row in result["rows"]}


def test_every_row_is_reported(result: dict[str, Any]) -> None:
    json.dumps(result)                         # JSON-ready as written by main()
    names = [row["row"] for row in result["rows"]]
    assert names == ["original", "adapter dropped", "gold", "gradient_ascent", "grad_diff",
                     "ihl", "npo", "simnpo", "feature_alignment", "ihl, sequential"]
    sizes = result["sizes"]
    assert (sizes["forget_examples"], sizes["retain_examples"], sizes["holdout_examples"],
            sizes["eval_holdout_examples"]) == (8, 56, 8, 8)
    for row in result["rows"]:
        for key in ("ks_p", "ks_p_truth_ratio"):
            assert all(0.0 <= p <= 1.0 for p in row[key]["values"])
    assert len(rows(result)["grad_diff"]["ks_p"]["values"]) == 4      # 2 runs × 2 gold seeds
    assert result["gold_vs_gold_ks_p"]["seed_pairs"] == [[0, 1]]
    for name in names[3:]:  # every method row is checked against the band on each seed
        assert set(rows(result)[name]["in_band"]) == {
            "forget_nll", "forget_accuracy", "retain_accuracy", "mia_gap", "ks_p", "all"}
    sequential = [r for r in result["runs"] if r["row"] == "ihl, sequential"]
    assert [len(r["extra"]["steps_per_request"]) for r in sequential] == [2, 2]  # 2 entities


def test_method_runs_follow_the_rule(result: dict[str, Any]) -> None:
    for run in result["runs"]:
        if run["row"] in METHODS:
            extra = run["extra"]
            assert 1 <= extra["steps"] <= 5
            assert extra["hyperparams"]["seed"] == run["seed"]
            # our scoring of the written adapter equals the library's own "after" report
            assert extra["library_metric_drift"] < 1e-4
            metrics = run["metrics"]
            for key in ("forget_exact_match", "forget_truth_ratio", "mia_auc_min_k",
                        "mia_auc_zlib", "mia_auc_reference", "privleak"):
                assert key in metrics, key


def test_reference_rows_sit_where_they_must(result: dict[str, Any]) -> None:
    by = rows(result)
    original, base, gold = by["original"], by["adapter dropped"], by["gold"]
    gold_acc = [r["metrics"]["forget_accuracy"] for r in result["runs"] if r["row"] == "gold"]
    # gold seeds agree with each other: a narrow band
    assert max(gold_acc) - min(gold_acc) <= 0.25
    assert gold["forget_accuracy"]["mean"] <= 0.3 and gold["retain_accuracy"]["mean"] >= 0.85
    # the original remembers what the gold never saw
    assert original["forget_accuracy"]["mean"] >= gold["forget_accuracy"]["mean"] + 0.6
    assert original["forget_nll"]["mean"] < gold["forget_nll"]["mean"] - 2.0
    assert original["ks_p"]["mean"] < 0.05 < result["gold_vs_gold_ks_p"]["mean"]
    assert original["mia_gap"]["mean"] > 0.3 > gold["mia_gap"]["mean"]
    # the base model alone knows neither the forget nor the retain facts
    assert base["forget_accuracy"]["mean"] <= 0.3 and base["retain_accuracy"]["mean"] <= 0.3


def test_render_has_the_table(bench: ModuleType, result: dict[str, Any]) -> None:
    text = bench.render(result)
    assert "| row | forget NLL | forget acc | retain acc |" in text
    assert "| row | exact match forget / retain |" in text
    assert "(gold vs gold)" in text and "Hyperparameters:" in text and "Command: `smoke`" in text
    assert text.count("\n| ") == 2 * len(result["rows"]) + 1   # two tables


def test_hyperparameters_are_library_defaults(bench: ModuleType) -> None:
    for method in METHODS:
        chosen = bench.hyperparams_for(method, 7, bench.FULL)
        assert chosen == dataclasses.replace(resolve_hyperparams(method), seed=7)
    assert bench.hyperparams_for("npo", 0, bench.QUICK).max_steps == 5


def test_summary_helpers_by_hand(bench: ModuleType) -> None:
    assert bench.mean_sd([1.0, 2.0, 3.0]) == {"mean": 2.0, "sd": 1.0, "n": 3}
    assert bench.mean_sd([4.0]) == {"mean": 4.0, "sd": 0.0, "n": 1}
    assert bench.ks_p([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert bench.ks_p([0.0] * 8, [1.0] * 8) < 0.001


def test_command_line(bench: ModuleType) -> None:
    full = bench.config_from(bench.parse_args([]))
    assert (full.world.entities, full.seeds, full.max_steps) == (100, (0, 1, 2, 3, 4), None)
    assert (full.world.n_forget, full.world.n_holdout) == (10, 20)
    assert full.sequential_methods == ("ihl", "feature_alignment")
    assert bench.config_from(bench.parse_args(["--sequential"])).sequential_methods == ()
    cfg = bench.config_from(bench.parse_args(["--quick", "--seeds", "3", "--methods", "npo"]))
    assert (cfg.seeds, cfg.methods, cfg.max_steps) == ((0, 1, 2), ("npo",), 5)
    for bad in (["--seeds", "1"], ["--entities", "200"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            bench.config_from(bench.parse_args(bad))
