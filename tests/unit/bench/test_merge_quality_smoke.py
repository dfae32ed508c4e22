"""Smoke run of bench/merge_quality.py and its toy world at tiny sizes: the harness is sane.

Checked: the toy tasks are disjoint and deterministic; every own adapter beats the base
model; the spread regime spreads the adapters' norms; CtM with ta at r = Σ r_t and
full-space ta are the same delta and score the same; scaling a λ = 1 merge is the merge at
λ; a merged adapter read back densely gives the logits PEFT gives when it loads that
adapter; tuning looks at validation only and scores test once; the whole run (toy regimes)
ends in JSON, a table and a plot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.unit.bench.bench_loader import load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("merge_quality")


@pytest.fixture(scope="module")
def toy() -> ModuleType:
    return load_bench("toy_world")


@pytest.fixture(scope="module")
def base(toy: ModuleType) -> torch.nn.Module:
    torch.set_num_threads(1)
    return toy.pretrain_base(replace(toy.TOY_QUICK, pretrain_steps=200))


@pytest.fixture(scope="module")
def world(toy: ModuleType, base: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory,
          ) -> Any:
    cfg = replace(toy.TOY_QUICK, pretrain_steps=200, lora_steps=100)
    return toy.build_world(cfg, 0, tmp_path_factory.mktemp("merge-quality"), base)


def test_tasks_are_disjoint_and_deterministic(toy: ModuleType, world: Any) -> None:
    cfg = toy.TOY_QUICK
    again = toy.make_tasks(cfg, 0)
    assert torch.equal(again.perms, world.suite.perms)
    for t in range(cfg.tasks):
        seen = [set(map(tuple, world.suite.splits[s][t].tolist())) for s in ("train", "val",
                                                                             "test")]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
        assert sum(map(len, seen)) == cfg.domain ** 3
    rows, owner = world.suite.eval_set("test")
    tokens = [set(rows[owner == t][:, 2:].flatten().tolist()) - {world.suite.vocab.eq}
              for t in range(cfg.tasks)]
    assert all(not (tokens[a] & tokens[b]) for a in range(len(tokens))
               for b in range(a + 1, len(tokens)))


def test_own_adapter_beats_base(bench: ModuleType, world: Any) -> None:
    base = world.evaluator.accuracies({}, "test")
    for t, adapter in enumerate(world.adapters):
        own = world.evaluator.accuracies(bench.read_deltas(adapter), "test")[t]
        assert own > base[t] + 0.3, (t, own, base[t])
    # evaluation leaves the base weights as they were
    assert world.evaluator.accuracies({}, "test") == base


def test_spread_regime_spreads_the_norms(toy: ModuleType, bench: ModuleType,
                                         base: torch.nn.Module, tmp_path: Path) -> None:
    cfg = replace(toy.TOY_QUICK_SPREAD, pretrain_steps=200, lora_steps=100)
    settings = toy.task_settings(cfg, 0)
    assert len({s for s in settings}) == cfg.tasks
    spread = toy.build_world(cfg, 0, tmp_path, base)
    norms = bench.delta_norms(bench.Merger(spread.adapters, 0, tmp_path))
    assert max(norms) / min(norms) > 2.0


def test_full_rank_ctm_ta_is_full_space_ta(bench: ModuleType, world: Any,
                                           tmp_path: Path) -> None:
    merger = bench.Merger(world.adapters, 0, tmp_path)
    rank = sum(1 for _ in world.adapters) * 8
    ctm, facts = merger.merge(bench.Row("ctm-ta", "ctm", "ta", "hooi"), rank, {"beta": 0.5})
    full, _ = merger.merge(bench.Row("full-ta", "full", "ta"), None, {})
    assert ctm.keys() == full.keys()
    for name in ctm:
        torch.testing.assert_close(ctm[name], full[name], rtol=1e-4, atol=1e-5)
    assert facts["mean_input_energy"] == pytest.approx(1.0, abs=1e-4)
    assert list(tmp_path.glob("merge-*")) == []      # merged dirs are cleaned up


@pytest.mark.parametrize(("row", "knobs"), [
    (("ctm-ties", "ctm", "ties", "hooi"), {"beta": 0.25, "density": 0.5}),
    (("ctm-dare_ties", "ctm", "dare_ties", "hosvd"), {"beta": 1.0, "density": 0.5, "drop": 0.3}),
    (("mtc-iso", "mtc", "iso", None), {}),
])
def test_scaling_a_unit_merge_is_the_merge_at_that_scale(bench: ModuleType, world: Any,
                                                         tmp_path: Path, row: tuple[Any, ...],
                                                         knobs: dict[str, float]) -> None:
    from lorafold.merge import MergeRequest, merge_adapters

    spec = bench.Row(*row)
    unit, _ = bench.Merger(world.adapters, 0, tmp_path).merge(spec, 4, knobs)
    request = MergeRequest(method=spec.method, rule=spec.rule, rank=4, seed=0, scale=0.7,
                           subspace=spec.subspace, beta=knobs.get("beta"),
                           density=knobs.get("density"), drop=knobs.get("drop"))
    direct = bench.read_deltas(merge_adapters(world.adapters, tmp_path / "direct", request,
                                              device="cpu").out_dir)
    for name, value in bench.scaled(unit, 0.7).items():
        torch.testing.assert_close(value, direct[name], rtol=1e-4, atol=1e-6)


def test_merged_adapter_loads_in_peft(bench: ModuleType, toy: ModuleType, world: Any,
                                      base: torch.nn.Module, tmp_path: Path) -> None:
    from peft import PeftModel

    from lorafold.merge import MergeRequest, merge_adapters

    out = merge_adapters(world.adapters, tmp_path / "ctm",
                         MergeRequest(method="ctm", rule="ties", rank=4, scale=0.7)).out_dir
    rows, _ = world.suite.eval_set("val")
    with torch.no_grad():
        world.evaluator.set_delta(bench.read_deltas(out))
        dense = toy.answer_logits(base, rows)
        world.evaluator.set_delta({})
        peft_model = PeftModel.from_pretrained(base, str(out))
        try:
            loaded = toy.answer_logits(peft_model, rows)
        finally:
            peft_model.unload()
    torch.testing.assert_close(loaded, dense, rtol=1e-4, atol=1e-4)
    assert not any("lora" in name for name, _ in base.named_modules())


class _FakeMerger:
    """Merges to a single number: the knobs' sum; counts merges."""

    def __init__(self) -> None:
        self.merges = 0

    def merge(self, row: Any, rank: Any, knobs: Mapping[str, float]) -> tuple[Any, Any]:
        self.merges += 1
        return {"w": torch.tensor(1.0 + 10 * knobs.get("density", 0.0),
                                  dtype=torch.float64)}, {"merge_s": 0.0}


class _FakeEvaluator:
    """Validation peaks at λ·(1 + 10·density) = 3 (λ 0.5, density 0.5); test elsewhere."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def accuracies(self, deltas: Mapping[str, torch.Tensor], split: str) -> list[float]:
        value = float(deltas["w"])
        self.calls.append((split, value))
        peak = 3.0 if split == "val" else 1.0
        return [1.0 - abs(value - peak) / 10, 0.5]


def test_tuning_looks_at_validation_only(bench: ModuleType) -> None:
    evaluator, merger = _FakeEvaluator(), _FakeMerger()
    scorer = bench.Scorer(merger, evaluator, {"val": [1.0, 1.0], "test": [1.0, 0.5]})
    grids = bench.Grids(scales=(0.3, 0.5, 1.0), densities=(0.25, 0.5, 0.8))
    run = bench.run_row(bench.Row("full-ties", "full", "ties"), None, scorer, grids)
    assert (run["scale"], run["knobs"]) == (0.5, {"density": 0.5})
    assert [split for split, _ in evaluator.calls].count("test") == 1
    assert evaluator.calls[-1] == ("test", 3.0)
    # each (configuration, λ) is scored once: 3 λ at the start, 2 more densities
    assert run["evaluations"] == len(scorer.scores) == 5
    assert len(evaluator.calls) == 5 + 1


def test_run_end_to_end(bench: ModuleType, toy: ModuleType, tmp_path: Path) -> None:
    tiny = replace(toy.TOY_QUICK, pretrain_steps=100, lora_steps=60)
    cfg = replace(bench.QUICK, regimes=(
        bench.Regime("toy", "toy", (0, 1), toy=tiny),
        bench.Regime("toy-spread", "toy", (0,), toy=replace(tiny, spread=True))))
    rows = [r for r in bench.default_rows()
            if r.label in {"full-ta", "full-ties", "mtc-ta", "core-iso", "ctm-ta",
                           "ctm-dare_ties-hosvd", "ctm-tsv"}]
    result = bench.run_benchmark(cfg, "smoke", workdir=tmp_path, rows=rows, log=lambda _: None)
    json.dumps(result)
    assert list(tmp_path.iterdir()) == []    # adapters and merges are deleted
    for regime in result["regimes"]:
        entries = {(e["row"], e["rank"]): e for e in regime["summary"]}
        assert set(entries) == {("full-ta", None), ("full-ties", None), ("mtc-ta", 4),
                                ("core-iso", 4), ("ctm-ta", 4), ("ctm-dare_ties-hosvd", 4),
                                ("ctm-tsv", 4)}
        for entry in entries.values():
            assert len(entry["scales"]) == len(regime["seeds"])
            assert set(entry["scales"]) <= set(cfg.grids.scales)
            assert entry["mean"] >= 0.0 and entry["sd"] >= 0.0
        assert entries[("ctm-ta", 4)]["vs_best_mtc"]["reference"] == "mtc-ta"
        assert entries[("ctm-ta", 4)]["subspace_energy"] >= \
            entries[("ctm-ta", 4)]["subspace_start_energy"] - 1e-9
        assert {e["beta"] for e in regime["beta_sweep"]} == set(cfg.grids.betas)
        tuned = {e["row"]: e for e in regime["tuned"]}   # lorafold.tune rows (toy: text)
        assert set(tuned) == {r.label for r in cfg.tuned}
        for entry in tuned.values():
            assert entry["rank"] == cfg.tuned_rank and 1 <= entry["evaluations"] <= \
                cfg.tuned_budget and entry["wall_s"] > 0
        assert tuned["tuned:ctm-ta"]["against"]["row"] == "ctm-ta"
    assert {r["row"] for r in result["overall"]["rows"]} == {
        "mtc-ta", "core-iso", "ctm-ta", "ctm-dare_ties-hosvd", "ctm-tsv"}
    text = bench.render(result)
    assert "### toy-spread" in text and "| ctm-dare_ties-hosvd |" in text and "β sweep" in text
    assert "By adapter norm" in text and "| learned:ctm-ta |" in text
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(result))
    bench.main(["--render", str(saved), "--out-dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "merge_quality.md").read_text().endswith(text)
    assert (tmp_path / "out" / "merge_quality.png").stat().st_size > 1000


def test_command_line(bench: ModuleType) -> None:
    cfg = bench.config_from(bench.parse_args(["--quick", "--seeds", "2", "--threads", "1"]))
    assert [r.seeds for r in cfg.regimes] == [(0, 1)] * 3 and cfg.threads == 1
    full = bench.config_from(bench.parse_args(["--regimes", "toy,minilm"]))
    assert [r.name for r in full.regimes] == ["toy", "minilm"] and full.ranks == (8, 16, 32)
    with pytest.raises(SystemExit):
        bench.config_from(bench.parse_args(["--seeds", "0"]))
    with pytest.raises(SystemExit):
        bench.config_from(bench.parse_args(["--regimes", "toy,imagenet"]))
