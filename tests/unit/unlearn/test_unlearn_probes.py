"""Robustness probes: RTN quantization by hand, then both probes on models trained here.

Probe world (built below on the session's pretrained tiny base): forget = 12 countries
(24 facts, 36 answer tokens), retain = the other 8 (16 facts). Three adapters:

- learned: trained on forget + retain (100% token accuracy on both);
- never: trained on retain only, so the forget facts were never shown;
- hid: learned, then gradient difference (−NLL forget + NLL retain, AdamW 1e-3, every LoRA
  factor) stopped as soon as forget accuracy is at most 0.1 (18 steps: forget 0.056,
  retain 0.875): unlearning that stops when the facts stop showing.

Relearning, measured (20 steps, lr 1e-3, batch 8; untouched half = 12 facts, 17 tokens),
over split seeds 0-5: hid recovered 0.50-0.79 accuracy (seed 0: 0.06 -> 0.65), NLL drop
4.99-5.72 nats; never recovered -0.11-0.06, NLL drop 0.04-0.49. Margins: hid >= 0.3 and
>= 3 nats; never <= 0.15 and <= 1 nat.

Quantization, measured: learned keeps 1.0 forget and retain accuracy at 8, 4 and 3 bits,
0.5 at 2 bits; never: forget 0.056 at full precision, 8 and 4 bits, retain 1.0. Margins:
never's quantized forget accuracy within 0.1 of full precision, retain >= 0.9.
Quantization recovery of a hidden model is not asserted, because this tiny model does not
show it: its weights are near-Gaussian (the 4-bit step is about a third of their spread),
so RTN is close to unbiased for small changes. The hid adapter's change (mean 0.33, max 2.9
four-bit steps) survives 4-bit RTN (forget 0.056 as at full precision); gradient ascent
small enough to stay under the step (lr 1e-4-3e-4) barely moves forget accuracy (1.0 ->
0.75 at best), and 4-bit RTN gave it back at most one token (+0.04).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from lorafold.merge.threads import torch_threads
from lorafold.unlearn.datasets import TextDataset, encode, make_batches, pad_id_of
from lorafold.unlearn.hyperparams import Hyperparams
from lorafold.unlearn.metrics import measure, token_stats
from lorafold.unlearn.probes import (
    quantization_probe,
    quantize_rtn,
    relearning_probe,
    run_probes,
    split_for_relearning,
)
from tests.unlearn_world import COUNTRIES, FactWorld, facts, fit

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RELEARN: dict[str, Any] = {"steps": 20, "lr": 1e-3, "batch_size": 8, "seed": 0}
HID_RECOVERS = 0.3
HID_NLL_DROP = 3.0
NEVER_RECOVERS = 0.15
NEVER_NLL_DROP = 1.0
QUANT_MARGIN = 0.1
RETAIN_FLOOR = 0.9


# --- quantize_rtn by hand -----------------------------------------------------------------


def test_values_on_the_grid_are_unchanged() -> None:
    weight = torch.tensor([[-7.0, -3.0, 0.0, 5.0, 7.0, 1.0, -1.0, 2.0]]) * 0.25
    assert torch.equal(quantize_rtn(weight, bits=4, group_size=8), weight)


def test_each_group_has_its_own_scale() -> None:
    # 3 bits: levels -3..3. Group 1 absmax 4 (scale 4/3), group 2 absmax 60 (scale 20).
    weight = torch.tensor([[4.0, -1.0, 2.5, 0.5, 9.0, -33.0, 21.0, 60.0]])
    expected = torch.tensor([[4.0, -4 / 3, 8 / 3, 0.0, 0.0, -40.0, 20.0, 60.0]])
    torch.testing.assert_close(quantize_rtn(weight, bits=3, group_size=4), expected)


def test_eight_bit_error_is_at_most_half_a_step_and_the_last_group_is_shorter() -> None:
    weight = torch.randn(16, 300, generator=torch.Generator().manual_seed(0))
    weight[:, 256:] *= 0.01  # the 44-wide last group must get its own, much smaller scale
    error = (quantize_rtn(weight, bits=8, group_size=128) - weight).abs()
    for start in (0, 128, 256):
        group = slice(start, start + 128)
        half_step = weight[:, group].abs().amax(dim=1, keepdim=True) / 127 / 2
        assert (error[:, group] <= half_step * (1 + 1e-5)).all()


def test_rows_narrower_than_a_group_are_one_group() -> None:
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(quantize_rtn(weight, bits=4, group_size=128),
                       quantize_rtn(weight, bits=4, group_size=64))
    assert not torch.equal(quantize_rtn(weight, bits=4, group_size=128),
                           quantize_rtn(weight, bits=4, group_size=32))


def test_shape_dtype_and_zero_groups_are_kept() -> None:
    weight = torch.randn(2, 3, 130, generator=torch.Generator().manual_seed(2))
    weight[0, 0] = 0.0
    out = quantize_rtn(weight.to(torch.bfloat16), bits=4, group_size=128)
    assert out.shape == weight.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all() and not out[0, 0].any()
    with pytest.raises(ValueError):
        quantize_rtn(weight, bits=1, group_size=128)


def test_a_change_far_below_the_step_is_rounded_away() -> None:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(64, 256, generator=generator)
    step = weight.reshape(64, 2, 128).abs().amax(dim=-1) / 7  # 4-bit step per group
    change = (torch.rand(64, 256, generator=generator) - 0.5) * 0.02 * step.min()
    moved = (quantize_rtn(weight + change, 4, 128) - quantize_rtn(weight, 4, 128)).abs()
    # a code changes only where the weight sat within 1% of a step of a rounding boundary
    assert (moved < step.min() / 2).float().mean() >= 0.97


# --- worlds ---------------------------------------------------------------------------------


@dataclass
class ProbeWorld:
    tokenizer: Any
    forget: TextDataset
    retain: TextDataset
    learned: Any
    never: Any
    hid: Any


def _accuracy(model: nn.Module, tokenizer: Any, data: TextDataset) -> float:
    batches = make_batches(encode(tokenizer, data), batch_size=len(data),
                           pad_id=pad_id_of(tokenizer))
    return measure(model, batches).accuracy


def _adapter(world: FactWorld, data: TextDataset) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(world.base_dir))
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=TARGETS))
    fit(model, world.tokenizer, data, steps=120, lr=3e-3, seed=1)
    return model


def _hide(model: Any, tokenizer: Any, forget: TextDataset, retain: TextDataset) -> int:
    """Gradient difference (−NLL forget + NLL retain) on every LoRA factor, stopped as soon
    as forget accuracy is at most 0.1: unlearning that stops when the facts stop showing."""
    def batch(data: TextDataset) -> Any:
        return make_batches(encode(tokenizer, data), batch_size=len(data),
                            pad_id=pad_id_of(tokenizer))[0]

    def nll(b: Any) -> torch.Tensor:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        return token_stats(logits, b.labels).nll.mean()

    forget_batch, retain_batch = batch(forget), batch(retain)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for step in range(1, 101):
        loss = nll(retain_batch) - nll(forget_batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if _accuracy(model, tokenizer, forget) <= 0.1:
            return step
    raise AssertionError("hiding did not bring forget accuracy to 0.1 in 100 steps")


def _build_probe_world(world: FactWorld) -> ProbeWorld:
    tokenizer = world.tokenizer
    forget = TextDataset.from_pairs(facts(COUNTRIES[:12]), name="forget")
    retain = TextDataset.from_pairs(facts(COUNTRIES[12:]), name="retain")
    learned = _adapter(world, TextDataset(forget.examples + retain.examples))
    never = _adapter(world, retain)
    hid = copy.deepcopy(learned)
    _hide(hid, tokenizer, forget, retain)
    for model in (learned, never, hid):
        model.eval()
    assert _accuracy(learned, tokenizer, forget) == 1.0
    assert _accuracy(never, tokenizer, forget) <= 0.1
    assert _accuracy(hid, tokenizer, retain) >= 0.8  # hidden, and the model still works
    return ProbeWorld(tokenizer, forget, retain, learned, never, hid)


@pytest.fixture(scope="module")
def probe_world(fact_world: FactWorld) -> Iterator[ProbeWorld]:
    # One thread, as for fact_world: the autouse one-thread fixture starts after this one,
    # and more threads on a busy machine made this build take 227 s instead of 2 s.
    with torch_threads(1):
        world = _build_probe_world(fact_world)
    yield world


@pytest.fixture(params=[False, True], ids=["frozen", "trainable"])
def loaded(fact_world: FactWorld, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The fact world's adapter as a job loads its output: frozen, or trainable in train mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(fact_world.base_dir))
    model = PeftModel.from_pretrained(base, str(fact_world.adapter_dir),
                                      is_trainable=request.param)
    model.train(request.param)
    yield model


# --- both probes -------------------------------------------------------------------------


def _snapshot(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, bool], list[bool]]:
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return (logits, {n: p.requires_grad for n, p in model.named_parameters()},
            [m.training for m in model.modules()])


def test_probes_leave_the_model_as_they_found_it(loaded: Any, fact_world: FactWorld) -> None:
    tokenizer = fact_world.tokenizer
    data = TextDataset(fact_world.forget.examples + fact_world.retain.examples)
    batch = make_batches(encode(tokenizer, data), batch_size=len(data),
                         pad_id=pad_id_of(tokenizer))[0]
    logits, flags, modes = _snapshot(loaded, batch)
    relearned = relearning_probe(loaded, tokenizer, fact_world.forget, steps=5, lr=1e-2)
    quantized = quantization_probe(loaded, tokenizer, fact_world.forget, fact_world.retain,
                                   bits=(4, 2))
    assert relearned["steps"] == 5 and set(quantized["bits"]) == {"4", "2"}
    after_logits, after_flags, after_modes = _snapshot(loaded, batch)
    assert torch.equal(after_logits, logits)
    assert after_flags == flags
    assert after_modes == modes
    assert all(p.grad is None for p in loaded.parameters())


def test_time_limits_stop_each_probe_and_say_so(fact_world: FactWorld, loaded: Any) -> None:
    tokenizer = fact_world.tokenizer
    relearned = relearning_probe(loaded, tokenizer, fact_world.forget, steps=5,
                                 time_limit_s=0.0)
    assert relearned["steps"] == 0 and relearned["timed_out"] is True
    assert relearned["after"] == relearned["before"]
    assert relearned["recovered_accuracy"] == 0.0
    quantized = quantization_probe(loaded, tokenizer, fact_world.forget, time_limit_s=0.0)
    assert quantized == {"group_size": 128, "timed_out": True, "bits": {},
                         "full_precision": {"forget_accuracy": 1.0}}


def test_run_probes_runs_what_the_hyperparameters_ask(fact_world: FactWorld,
                                                      loaded: Any) -> None:
    sets = {"forget": fact_world.forget, "retain": fact_world.retain}
    hp = Hyperparams(relearn_probe_steps=2, quantization_probe=True)
    probes = run_probes(loaded, fact_world.tokenizer, sets, hp)
    assert probes["relearning"]["steps"] == 2 and not probes["relearning"]["timed_out"]
    assert set(probes["quantization"]["bits"]) == {"8", "4"}
    assert set(probes["quantization"]["full_precision"]) == {"forget_accuracy",
                                                            "retain_accuracy"}
    one = {"forget": TextDataset(fact_world.forget.examples[:1])}
    assert run_probes(loaded, fact_world.tokenizer, one,
                      Hyperparams(relearn_probe_steps=2)) == {
        "relearning": {"skipped": "the forget set has fewer than 2 examples"}}
    assert run_probes(loaded, fact_world.tokenizer, sets, Hyperparams()) == {}


# --- relearning ---------------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_complete(probe_world: ProbeWorld) -> None:
    forget = probe_world.forget
    relearn, untouched = split_for_relearning(forget, seed=0)
    assert (len(relearn), len(untouched)) == (12, 12)
    assert sorted(map(str, relearn.examples + untouched.examples)) == \
        sorted(map(str, forget.examples))
    assert split_for_relearning(forget, seed=0) == (relearn, untouched)
    assert split_for_relearning(forget, seed=1)[0] != relearn


def test_relearning_brings_back_hidden_facts_only(probe_world: ProbeWorld) -> None:
    w = probe_world
    hid = relearning_probe(w.hid, w.tokenizer, w.forget, **RELEARN)
    never = relearning_probe(w.never, w.tokenizer, w.forget, **RELEARN)
    for report in (hid, never):
        assert report["steps"] == RELEARN["steps"] and report["timed_out"] is False
        assert (report["relearn_examples"], report["untouched_examples"]) == (12, 12)
    assert hid["recovered_accuracy"] >= HID_RECOVERS
    assert hid["before"]["nll"] - hid["after"]["nll"] >= HID_NLL_DROP
    assert never["recovered_accuracy"] <= NEVER_RECOVERS
    assert never["before"]["nll"] - never["after"]["nll"] <= NEVER_NLL_DROP


# --- quantization -------------------------------------------------------------------------


def _merged_quantized_accuracy(model: Any, world: ProbeWorld, bits: int) -> dict[str, float]:
    """The reference: PEFT's own merge, then every Linear but lm_head quantized in place."""
    merged = copy.deepcopy(model).merge_and_unload()
    with torch.no_grad():
        for name, module in merged.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                module.weight.copy_(quantize_rtn(module.weight, bits, 128))
    return {"forget_accuracy": _accuracy(merged, world.tokenizer, world.forget),
            "retain_accuracy": _accuracy(merged, world.tokenizer, world.retain)}


def test_quantization_folds_the_adapter_in(probe_world: ProbeWorld) -> None:
    w = probe_world
    report = quantization_probe(w.learned, w.tokenizer, w.forget, w.retain, bits=(8, 2))
    assert report["full_precision"] == {"forget_accuracy": 1.0, "retain_accuracy": 1.0}
    # the adapter layers are disabled, so only a folded-in delta keeps the facts at 8 bits
    assert report["bits"]["8"] == {"forget_accuracy": 1.0, "retain_accuracy": 1.0}
    assert report["bits"]["2"]["forget_accuracy"] < 1.0  # 2 bits really quantizes
    for bits in (8, 2):
        assert report["bits"][str(bits)] == _merged_quantized_accuracy(w.learned, w, bits)


def test_quantization_gives_a_never_learned_adapter_nothing(probe_world: ProbeWorld) -> None:
    w = probe_world
    report = quantization_probe(w.never, w.tokenizer, w.forget, w.retain)
    assert report["timed_out"] is False and set(report["bits"]) == {"8", "4"}
    baseline = report["full_precision"]["forget_accuracy"]
    for result in report["bits"].values():
        assert result["forget_accuracy"] <= baseline + QUANT_MARGIN
        assert result["retain_accuracy"] >= RETAIN_FLOOR
