"""Smoke run of bench/minilm_world.py at QUICK sizes: the pretrained-model world is sane.

Checked: every own adapter, read back densely from its saved PEFT dir, beats its task's
head on the bare base by a clear margin; `accuracies` leaves every base weight bit-for-bit
as it was; sentences, labels and training are deterministic for a seed, the splits are
disjoint and every task's labels exactly balanced; PEFT loads a saved adapter onto the base
and gives the features of base + dense delta, and the evaluator's cached path gives the
features of the plain full-model forward.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from lorafold.adapters.config import PEFT_PREFIX
from lorafold.adapters.reader import open_adapter
from tests.unit.bench.bench_loader import load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("minilm_world")


@dataclass
class World:
    cfg: Any
    base: torch.nn.Module
    world: Any
    own: list[dict[str, torch.Tensor]]


def dense_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """scale·B·A per module, keyed by the base model's parameter name."""
    with open_adapter(adapter_dir) as adapter:
        return {f.spec.name.removeprefix(PEFT_PREFIX) + ".weight":
                f.scale * (f.B.float() @ f.A.float()) for f in adapter.iter_modules()}


@pytest.fixture(scope="module")
def world(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # 2 threads are slower on a shared 2-core runner
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        cfg = bench.QUICK
        base = bench.load_base()
        built = bench.build_world(cfg, 0, tmp_path_factory.mktemp("minilm-world"), base)
        yield World(cfg, base, built, [dense_deltas(a) for a in built.adapters])
    torch.set_num_threads(threads)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_adapters_are_plain_lora_on_the_evaluated_weights(bench: ModuleType,
                                                          world: World) -> None:
    assert len(world.world.adapters) == world.cfg.tasks
    for t, adapter in enumerate(world.world.adapters):
        assert adapter.name == f"seed0-task{t}"
        assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json",
                                                             "adapter_model.safetensors"]
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == bench.BASE_NAME
        assert config["r"] == world.cfg.lora_rank and not config.get("modules_to_save")
        assert sorted(world.own[t]) == sorted(world.world.evaluator.params)
    # LoRA on query, value and the three dense layers of each adapted layer, nothing else
    assert len(world.world.evaluator.params) == 5 * len(world.cfg.lora_layers)
    assert not any("lora" in name for name, _ in world.base.named_modules())
    assert not world.base.training                       # no dropout in any forward


def test_own_adapter_beats_base_head(world: World) -> None:
    ev = world.world.evaluator
    for split in ("val", "test"):
        base = ev.accuracies({}, split)
        for t, deltas in enumerate(world.own):
            own = ev.accuracies(deltas, split)[t]
            assert own >= 0.8 and own > base[t] + 0.2, (split, t, own, base[t])


def test_accuracies_restores_the_base_exactly(world: World) -> None:
    ev = world.world.evaluator
    before = _snapshot(world.base)
    base_acc = ev.accuracies({}, "val")
    gen = torch.Generator().manual_seed(0)
    noise = {name: torch.randn(p.shape, generator=gen, dtype=torch.float64)
             for name, p in ev.params.items()}
    assert ev.accuracies(noise, "val") != base_acc       # the delta was really applied
    ev.accuracies(world.own[0], "test")
    with pytest.raises(KeyError):
        ev.accuracies({"embeddings.word_embeddings.weight": torch.zeros(1)}, "val")
    after = _snapshot(world.base)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ev.accuracies({}, "val") == base_acc


def test_world_is_deterministic(bench: ModuleType, world: World, tmp_path: Path) -> None:
    cfg = world.cfg
    data = bench.make_data(cfg, 0)
    again = bench.make_data(cfg, 0)
    other = bench.make_data(cfg, 1)
    for split in ("train", "val", "test"):
        assert data[split].sentences == again[split].sentences
        assert torch.equal(data[split].labels, again[split].labels)
        assert data[split].sentences != other[split].sentences
    for split in ("val", "test"):
        assert world.world.evaluator.sentences[split] == data[split].sentences
    sets = [set(data[s].sentences) for s in ("train", "val", "test")]
    assert sum(map(len, sets)) == len(sets[0] | sets[1] | sets[2])          # disjoint, unique
    for split in ("train", "val", "test"):
        for t, task in enumerate(bench.TASKS):
            counts = Counter(data[split].labels[:, t].tolist())
            assert sorted(counts) == list(range(task.classes))
            assert max(counts.values()) - min(counts.values()) <= 1
    # training is seeded: the same adapter twice, bit for bit
    short = replace(cfg, steps=(5,) * cfg.tasks, train_per_task=64)
    short_data = bench.make_data(short, 0)
    tokenizer = bench.load_tokenizer()
    first = min(short.lora_layers)
    train = bench.encode(world.base, tokenizer, short_data["train"].sentences, first,
                         short.max_length)
    runs = []
    for name in ("a", "b"):
        head, _, _ = bench.train_adapter(world.base, train, short_data["train"].labels, 1,
                                         short, 0, tmp_path / name)
        runs.append((dense_deltas(tmp_path / name), head.weight.clone()))
    assert runs[0][0].keys() == runs[1][0].keys()
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    assert torch.equal(runs[0][1], runs[1][1])
    assert not any("lora" in name for name, _ in world.base.named_modules())


def test_peft_loads_an_adapter(bench: ModuleType, world: World,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ev = world.world.evaluator
    tokenizer = bench.load_tokenizer()
    batch = tokenizer(list(ev.sentences["val"][:48]), padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()          # padded rows: the mask matters
    deltas = world.own[1]
    with torch.no_grad():
        plain = bench.embed(world.base, batch["input_ids"], batch["attention_mask"])
        try:
            for name, delta in deltas.items():
                ev.params[name].add_(delta)
            dense = bench.embed(world.base, batch["input_ids"], batch["attention_mask"])
        finally:
            for name in deltas:
                ev.params[name].copy_(ev.base[name])
        peft_model = PeftModel.from_pretrained(world.base, str(world.world.adapters[1]))
        try:
            loaded = bench.embed(peft_model, batch["input_ids"], batch["attention_mask"])
        finally:
            peft_model.unload()
    assert not any("lora" in name for name, _ in world.base.named_modules())
    torch.testing.assert_close(loaded, dense, rtol=1e-4, atol=1e-4)
    assert (loaded - plain).abs().max() > 1e-2                    # the adapter does something
    # the evaluator's path (cached frozen layers, unpadded buckets) is the same model
    cached = bench.features(world.base, ev.encoded["val"], ev.first)[:48]
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-4)
    logits = ev.logits(deltas, "val")[:48]
    lo, hi = ev.offsets[1], ev.offsets[2]
    expected = dense @ ev.head_weight[lo:hi].T + ev.head_bias[lo:hi]
    torch.testing.assert_close(logits[:, lo:hi], expected, rtol=1e-4, atol=1e-4)
