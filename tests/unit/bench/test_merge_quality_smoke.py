"""Smoke run of bench/merge_quality.py at tiny sizes: the quality harness is sane.

Checked: every own adapter beats the base model on its task; `cat` of all adapters at
weight 1 and full-space `ta` at λ = 1 are the same delta, so they score exactly the same;
a merged adapter read back densely gives the logits PEFT gives when it loads that adapter;
λ is chosen on validation only; the whole run ends in JSON, a table and a plot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.unit.bench.bench_loader import load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("merge_quality")


@dataclass
class World:
    cfg: Any
    base: torch.nn.Module
    suite: Any
    adapters: list[Path]
    evaluator: Any
    own: list[dict[str, torch.Tensor]]
    workdir: Path


@pytest.fixture(scope="module")
def world(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> World:
    cfg = replace(bench.QUICK, pretrain_steps=200, lora_steps=100)
    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("merge-quality")
    base = bench.pretrain_base(cfg)
    suite = bench.make_tasks(cfg, 0)
    adapters = [bench.train_adapter(base, suite, t, cfg, 0, workdir / f"t{t}")
                for t in range(cfg.tasks)]
    evaluator = bench.Evaluator(base, suite, cfg.lora_targets)
    own = [bench.read_deltas(a) for a in adapters]
    return World(cfg, base, suite, adapters, evaluator, own, workdir)


def _inputs(bench: ModuleType, world: World) -> Any:
    stack = {name: torch.stack([d[name] for d in world.own]) for name in world.own[0]}
    return bench.MergeInputs(adapters=world.adapters, stack=stack, density=0.5, seed=0,
                             workdir=world.workdir)


def test_tasks_are_disjoint_and_deterministic(bench: ModuleType, world: World) -> None:
    again = bench.make_tasks(world.cfg, 0)
    assert torch.equal(again.perms, world.suite.perms)
    for t in range(world.cfg.tasks):
        seen = [set(map(tuple, world.suite.splits[s][t].tolist())) for s in ("train", "val",
                                                                             "test")]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
        assert sum(map(len, seen)) == world.cfg.domain ** 3
    rows, owner = world.suite.eval_set("test")
    tokens = [set(rows[owner == t][:, 2:].flatten().tolist()) - {world.suite.vocab.eq}
              for t in range(world.cfg.tasks)]
    assert all(not (tokens[a] & tokens[b]) for a in range(len(tokens))
               for b in range(a + 1, len(tokens)))


def test_own_adapter_beats_base(world: World) -> None:
    base = world.evaluator.accuracies({}, "test")
    for t, deltas in enumerate(world.own):
        own = world.evaluator.accuracies(deltas, "test")[t]
        assert own > base[t] + 0.3, (t, own, base[t])
    # evaluation leaves the base weights as they were
    assert world.evaluator.accuracies({}, "test") == base


def test_cat_is_full_space_ta(bench: ModuleType, world: World) -> None:
    inputs = _inputs(bench, world)
    cat, _ = bench.merge_lorafold(bench.Method("cat", "lorafold", "cat"), inputs, None, 1.0)
    full, _ = bench.merge_dense(bench.Method("full-ta", "dense", "full"), inputs, None, 1.0)
    assert cat.keys() == full.keys()
    for name in cat:
        torch.testing.assert_close(cat[name], full[name], rtol=1e-5, atol=1e-6)
    for split in ("val", "test"):
        assert world.evaluator.accuracies(cat, split) == world.evaluator.accuracies(full, split)
    assert list(world.workdir.glob("merge-*")) == []      # merged dirs are cleaned up


def test_merged_adapter_loads_in_peft(bench: ModuleType, world: World) -> None:
    from peft import PeftModel

    from lorafold.merge import MergeRequest, merge_adapters

    out = merge_adapters(world.adapters, world.workdir / "ctm",
                         MergeRequest(method="ctm", rule="ties", rank=4, scale=0.7)).out_dir
    rows, _ = world.suite.eval_set("val")
    with torch.no_grad():
        world.evaluator.set_delta(bench.read_deltas(out))
        dense = bench.answer_logits(world.base, rows)
        world.evaluator.set_delta({})
        peft_model = PeftModel.from_pretrained(world.base, str(out))
        try:
            loaded = bench.answer_logits(peft_model, rows)
        finally:
            peft_model.unload()
    torch.testing.assert_close(loaded, dense, rtol=1e-4, atol=1e-4)
    assert not any("lora" in name for name, _ in world.base.named_modules())


class _FakeEvaluator:
    """Validation accuracy peaks at λ = 0.5; records which λ each split was scored at."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def accuracies(self, deltas: Mapping[str, torch.Tensor], split: str) -> list[float]:
        scale = float(deltas["w"])
        self.calls.append((split, scale))
        peak = 1.0 if split == "val" else 2.0
        return [1.0 - abs(scale - 0.5) * peak, 0.5]


def test_scale_is_picked_on_validation_only(bench: ModuleType,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_merge(m: Any, inputs: Any, rank: int | None, scale: float) -> tuple[Any, float]:
        return {"w": torch.tensor(scale, dtype=torch.float64)}, 0.01

    monkeypatch.setitem(bench.MERGERS, "dense", fake_merge)
    evaluator = _FakeEvaluator()
    own = {"val": [1.0, 1.0], "test": [1.0, 0.5]}
    run = bench.run_method(bench.Method("full-ta", "dense", "full"), None, None, evaluator,
                           own, (0.3, 0.5, 1.0))
    assert run["scale"] == 0.5
    assert evaluator.calls == [("val", 0.3), ("val", 0.5), ("val", 1.0), ("test", 0.5)]
    assert run["normalised"] == [1.0, 1.0] and run["mean_normalised"] == 1.0


def test_run_end_to_end(bench: ModuleType, tmp_path: Path) -> None:
    cfg = replace(bench.QUICK, pretrain_steps=100, lora_steps=60, seeds=(0, 1))
    methods = [m for m in bench.default_methods()
               if m.label in {"cat", "full-ta", "full-ties", "mtc-ta", "ctm-ta", "ctm-iso-bal",
                              "core-ta"}]
    result = bench.run_benchmark(cfg, "smoke", workdir=tmp_path, methods=methods,
                                 log=lambda _: None)
    json.dumps(result)
    assert list(tmp_path.iterdir()) == []    # adapters and merges are deleted
    rows = {(r["method"], r["rank"]): r for r in result["summary"]}
    assert set(rows) == {("cat", None), ("full-ta", None), ("full-ties", None), ("mtc-ta", 4),
                         ("ctm-ta", 4), ("ctm-iso-bal", 4), ("core-ta", 4)}
    for row in rows.values():
        assert len(row["scales"]) == 2 and set(row["scales"]) <= set(cfg.scales)
        assert row["merge_ms"] > 0 and row["mean"] >= 0.0 and row["sd"] >= 0.0
    # same delta, same validation curve, same λ, same test accuracy
    assert rows[("cat", None)]["mean"] == rows[("full-ta", None)]["mean"]
    assert rows[("cat", None)]["output_rank"] == cfg.tasks * cfg.lora_rank
    text = bench.render(result)
    assert "| ctm-iso-bal |" in text and "| cat (rank 24) |" in text and "r = 4" in text
    bench.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_command_line(bench: ModuleType) -> None:
    cfg = bench.config_from(bench.parse_args(["--quick", "--seeds", "2", "--threads", "2"]))
    assert (cfg.tasks, cfg.seeds, cfg.threads) == (3, (0, 1), 2)
    full = bench.config_from(bench.parse_args([]))
    assert (full.tasks, full.lora_rank, full.ranks, full.seeds) == (8, 8, (8, 16, 32), (0, 1, 2))
    with pytest.raises(SystemExit):
        bench.config_from(bench.parse_args(["--seeds", "0"]))
