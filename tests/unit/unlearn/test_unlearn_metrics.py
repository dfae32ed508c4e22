"""NLL, token accuracy, exact match, extraction strength, truth ratio and the summary: by hand
on logits small enough to check on paper, then on the fact world against generate()."""

from __future__ import annotations

import math
import random
import zlib
from typing import Any

import pytest
import torch
from torch import nn

from lorafold.unlearn.datasets import (
    IGNORE_INDEX,
    Batch,
    Example,
    TextDataset,
    encode,
    make_batches,
    pad_id_of,
)
from lorafold.unlearn.metrics import (
    SetMetrics,
    evaluate,
    example_stats,
    measure,
    measure_sets,
    mia_auc,
    nll_quantiles,
    summarize,
    token_stats,
    truth_ratio,
)
from tests.unlearn_world import CAPITALS, COUNTRIES, FORGET, RETAIN, FactWorld, build_tokenizer


def test_token_stats_by_hand() -> None:
    # vocab of 3; sequence [x, 1, 2]: position 0 predicts token 1, position 1 predicts token 2.
    logits = torch.tensor([[[0.0, math.log(3.0), 0.0],     # p(1) = 3/5, argmax 1 (right)
                            [math.log(2.0), 0.0, 0.0],     # p(2) = 1/4, argmax 0 (wrong)
                            [9.0, 9.0, 9.0]]])             # last position predicts nothing
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])
    stats = token_stats(logits, labels)
    expected = (-math.log(3 / 5) - math.log(1 / 4)) / 2
    assert stats.n_tokens.tolist() == [2]
    assert stats.n_correct.tolist() == [1]
    assert stats.nll.item() == pytest.approx(expected, rel=1e-6)
    # a prompt token (label IGNORE_INDEX) counts for nothing
    stats = token_stats(logits, torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2]]))
    assert stats.n_tokens.tolist() == [1]
    assert stats.nll.item() == pytest.approx(-math.log(1 / 4), rel=1e-6)


def test_auc_counts_ties_as_half() -> None:
    # pairs (member, nonmember): (1,2) 1, (1,3) 1, (2,2) 1/2, (2,3) 1 -> 3.5 / 4
    assert mia_auc([1.0, 2.0], [2.0, 3.0]) == pytest.approx(0.875)
    assert mia_auc([1.0, 1.0], [1.0, 1.0]) == pytest.approx(0.5)
    assert mia_auc([0.1, 0.2], [5.0, 6.0]) == 1.0   # members clearly lower: remembered
    assert mia_auc([5.0, 6.0], [0.1, 0.2]) == 0.0


def test_auc_matches_the_pairwise_definition() -> None:
    rng = random.Random(0)
    members = [rng.choice([0.5, 1.0, 1.5, 2.0]) for _ in range(17)]
    nonmembers = [rng.choice([1.0, 1.5, 2.0, 2.5]) for _ in range(23)]
    pairwise = sum(1.0 if m < n else 0.5 if m == n else 0.0
                   for m in members for n in nonmembers) / (17 * 23)
    assert mia_auc(members, nonmembers) == pytest.approx(pairwise, abs=1e-12)


def test_auc_needs_both_sides() -> None:
    with pytest.raises(ValueError):
        mia_auc([], [1.0])


def test_evaluate_reports_every_set_and_the_auc(fact_world: FactWorld) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fact_world.base_dir))
    result = evaluate(model, fact_world.tokenizer,
                      {"forget": fact_world.forget, "holdout": fact_world.holdout,
                       "empty": TextDataset()})
    per_set = {f"{name}_{stat}" for name in ("forget", "holdout")
               for stat in ("nll", "accuracy", "exact_match", "extraction_strength")}
    assert set(result) == per_set | {"forget_nll_quantiles", "mia_auc", "mia_auc_min_k",
                                     "mia_auc_zlib", "privleak"}
    quantiles = result.pop("forget_nll_quantiles")
    assert isinstance(quantiles, dict) and list(quantiles) == ["q10", "q25", "q50", "q75", "q90"]
    values = [*result.values(), *quantiles.values()]
    assert all(type(v) is float and math.isfinite(v) for v in values)  # JSON-ready
    assert 0.0 <= result["forget_accuracy"] <= 1.0


# --- exact match and extraction strength --------------------------------------------------


def _logits_with_argmax(argmax: list[list[int]], vocab: int = 3) -> torch.Tensor:
    """Logits whose argmax at position t is argmax[row][t] (one extra, ignored, position)."""
    logits = torch.zeros(len(argmax), len(argmax[0]) + 1, vocab)
    for row, tokens in enumerate(argmax):
        for t, token in enumerate(tokens):
            logits[row, t, token] = 2.0
    return logits


def test_exact_match_and_extraction_strength_by_hand() -> None:
    # one prompt token, completion [1, 2, 1]: positions 0..2 predict it.
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 1]] * 5
                          + [[IGNORE_INDEX, IGNORE_INDEX, 2, IGNORE_INDEX]])  # 1 token, padded
    argmax = [[1, 2, 1],   # all right: greedy reproduces it, ES 1
              [0, 0, 1],   # only the last right: needs the prefix of 2, ES 1/3
              [1, 2, 0],   # last wrong: not even given all but the last, ES 0
              [0, 2, 1],   # first wrong: prefix of 1 suffices, ES 2/3
              [1, 0, 1],   # middle wrong: prefix of 2, ES 1/3
              [0, 2, 0]]   # the padded row's one token (position 1) is right
    stats = example_stats(_logits_with_argmax(argmax), labels)
    assert stats.exact.tolist() == [True, False, False, False, False, True]
    assert stats.extraction.tolist() == pytest.approx([1.0, 1 / 3, 0.0, 2 / 3, 1 / 3, 1.0])
    assert stats.n_correct.tolist() == [3, 1, 2, 2, 2, 1]
    # the pooled statistics are token_stats' own
    plain = token_stats(_logits_with_argmax(argmax), labels)
    assert torch.equal(stats.logprob_sum, plain.logprob_sum)
    assert torch.equal(stats.n_tokens, plain.n_tokens)


def test_min_k_keeps_the_least_likely_fifth_of_completion_tokens_by_hand() -> None:
    # 10 completion tokens: k = 2, the two least likely. Position t predicts labels[t + 1].
    probs = [0.9, 0.5, 0.01, 0.8, 0.7, 0.02, 0.6, 0.9, 0.9, 0.9]
    logits = torch.zeros(1, 12, 2)
    logits[0, :10, 1] = torch.tensor([math.log(p / (1 - p)) for p in probs])
    logits[0, 10, 1] = -50.0  # a padded position, hugely unlikely: must not count
    labels = torch.tensor([[IGNORE_INDEX] + [1] * 10 + [IGNORE_INDEX]])
    stats = example_stats(logits, labels)
    assert stats.min_k.item() == pytest.approx((-math.log(0.01) - math.log(0.02)) / 2, rel=1e-5)
    # 3 tokens: 20 % of 3 rounds down to 0, yet at least one token counts
    short = example_stats(logits[:, :4], labels[:, :4])
    assert short.min_k.item() == pytest.approx(-math.log(0.01), rel=1e-5)


# --- truth ratio --------------------------------------------------------------------------


class _FixedNextToken(nn.Module):
    """The same next-token distribution at every position, whatever the input."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.logp = nn.Parameter(probs.log())

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.logp.expand(*batch.input_ids.shape, -1)


def test_truth_ratio_by_hand() -> None:
    # the true answer is more probable than the wrong ones on average: R < 1
    assert truth_ratio(1.0, [2.0, 4.0]) == pytest.approx(math.exp(1.0 - 3.0))
    assert truth_ratio(2.0, [2.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        truth_ratio(1.0, [])


def test_measure_sets_pairs_each_prompt_with_its_own_perturbed_answers() -> None:
    tok = build_tokenizer()
    vocab = len(tok.get_vocab())
    probs = torch.full((vocab,), 0.125 / (vocab - 4))
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("Quell", "Mirth", "Esk", "Orrin")}
    for word, p in (("Quell", 0.5), ("Mirth", 0.1), ("Esk", 0.025), ("Orrin", 0.25)):
        probs[ids[word]] = p
    model = _FixedNextToken(probs)
    model.train()
    data = TextDataset([Example("The capital of Zorvania is", "Quell", ("Mirth", "Esk")),
                        Example("The capital of Quelmar is", "Mirth"),
                        Example("The capital of Bractis is", "Esk", ("Orrin",))])
    sets = measure_sets(model, tok, {"facts": data, "none": TextDataset(data.examples[1:2])},
                        batch_size=2, forward=lambda m, b: m.logits(b))
    # geometric mean of the wrong answers' probabilities over the true one's
    assert sets["facts"].truth_ratio[0] == pytest.approx(math.sqrt(0.1 * 0.025) / 0.5, rel=1e-5)
    assert sets["facts"].truth_ratio[1] is None
    assert sets["facts"].truth_ratio[2] == pytest.approx(0.25 / 0.025, rel=1e-5)
    assert sets["none"].truth_ratio == [None]
    assert model.training  # restored
    summary = summarize(sets)
    assert summary["facts_truth_ratio"] == pytest.approx(math.sqrt(0.1 * 10.0), rel=1e-5)
    assert "none_truth_ratio" not in summary


# --- summary ------------------------------------------------------------------------------


def _set(nll: list[float], *, min_k: list[float] | None = None,
         zlib_scores: list[float] | None = None, exact: list[bool] | None = None) -> SetMetrics:
    """A hand-built SetMetrics: one token per example, all correct."""
    n = len(nll)
    return SetMetrics(nll, n, n, exact or [True] * n, [1.0] * n, min_k or nll, zlib_scores,
                      [None] * n)


def test_summary_by_hand() -> None:
    forget = _set([1.0, 2.0, 3.0, 4.0, 5.0], min_k=[0.1, 0.2, 0.3, 0.4, 0.5],
                  zlib_scores=[9.0, 9.0, 1.0, 1.0, 1.0], exact=[True, True, False, False, False])
    holdout = _set([1.5, 4.5], min_k=[0.35, 0.6], zlib_scores=[1.0, 2.0])
    summary = summarize({"forget": forget, "holdout": holdout})
    assert summary["forget_exact_match"] == pytest.approx(0.4)
    assert summary["forget_extraction_strength"] == 1.0
    # linear interpolation: q10 of 1..5 sits at 0.4 of the way from 1 to 2
    assert summary["forget_nll_quantiles"] == pytest.approx(
        {"q10": 1.4, "q25": 2.0, "q50": 3.0, "q75": 4.0, "q90": 4.6})
    # Min-K: 0.1, 0.2, 0.3 below both; 0.4, 0.5 below 0.6 only: 8 / 10
    assert summary["mia_auc_min_k"] == pytest.approx(0.8)
    assert summary["privleak"] == pytest.approx((0.8 - 0.5) / 0.5)
    # zlib: 9 above both, 1 ties 1.0 (half) and is below 2.0: (0 + 0 + 3 * 1.5) / 10
    assert summary["mia_auc_zlib"] == pytest.approx(0.45)
    assert "mia_auc_reference" not in summary
    assert "forget_truth_ratio" not in summary


def test_reference_attack_subtracts_the_reference_nll_per_example() -> None:
    forget, holdout = _set([1.0, 2.0]), _set([1.5, 4.0])
    reference = {"forget": _set([3.0, 2.5]), "holdout": _set([1.0, 4.5])}
    # scores: forget [-2, -0.5], holdout [0.5, -0.5]: 1 + 1 + 1 + 1/2 of 4 pairs
    summary = summarize({"forget": forget, "holdout": holdout}, reference=reference)
    assert summary["mia_auc_reference"] == pytest.approx(0.875)
    assert summary["mia_auc"] == pytest.approx(0.75)  # the raw losses tell less
    no_holdout = summarize({"forget": forget, "holdout": holdout},
                           reference={"forget": reference["forget"]})
    assert "mia_auc_reference" not in no_holdout


def test_quantiles_of_one_value() -> None:
    assert nll_quantiles([2.5]) == {"q10": 2.5, "q25": 2.5, "q50": 2.5, "q75": 2.5, "q90": 2.5}


# --- on the fact world --------------------------------------------------------------------


def _base(world: FactWorld) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(world.base_dir)).eval()


def _tuned(world: FactWorld) -> Any:
    """Base + the LoRA that memorised the forget and retain facts."""
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(world), str(world.adapter_dir)).eval()


def _greedy_reproduces(model: Any, tokenizer: Any, example: Example) -> bool:
    prompt = tokenizer(example.prompt, return_tensors="pt")
    target = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    out = model.generate(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"],
                         do_sample=False, max_new_tokens=len(target),
                         pad_token_id=pad_id_of(tokenizer))
    return bool(out[0, prompt["input_ids"].shape[1]:].tolist() == target)


def test_exact_match_is_what_greedy_generation_produces(fact_world: FactWorld) -> None:
    data = TextDataset(fact_world.forget.examples + fact_world.retain.examples
                       + fact_world.holdout.examples)
    seen = set()
    for model in (_base(fact_world), _tuned(fact_world)):
        exact = measure_sets(model, fact_world.tokenizer, {"all": data}, batch_size=8)["all"].exact
        greedy = [_greedy_reproduces(model, fact_world.tokenizer, e) for e in data]
        assert exact == greedy
        seen.update(exact)
    assert seen == {True, False}  # both outcomes occur, so the comparison means something


def test_measure_keeps_dataset_order_and_zlib_uses_the_summed_nll(fact_world: FactWorld) -> None:
    tok, data = fact_world.tokenizer, fact_world.retain
    model = _tuned(fact_world)
    items = encode(tok, data)
    completions = [e.completion for e in data]
    ordered = measure(model, make_batches(items, batch_size=32, pad_id=0),
                      completions=completions)
    shuffled = measure(model, make_batches(items, batch_size=5, pad_id=0,
                                           generator=torch.Generator().manual_seed(3)),
                       completions=completions)
    for field in ("nll", "exact", "extraction", "min_k", "zlib"):
        assert getattr(shuffled, field) == pytest.approx(getattr(ordered, field), abs=1e-5), field
    assert ordered.zlib is not None
    for i, item in enumerate(items):
        n_completion = len(item.input_ids) - item.prompt_len
        summed = ordered.nll[i] * n_completion
        length = len(zlib.compress(completions[i].encode("utf-8")))
        assert ordered.zlib[i] == pytest.approx(summed / length, rel=1e-5)
    assert measure(model, make_batches(items, batch_size=32, pad_id=0)).zlib is None


# Bounds: the memorising model scores AUC 1.0 on every attack (0.95 leaves a margin of
# nearly one forget/holdout pair in 16). The base model never saw any of the 20 fictitious
# countries; with 20 facts a side its AUCs came out within 0.15 of 0.5 (loss 0.38, Min-K
# 0.355, zlib 0.39; AUC standard error here about 0.09), so 0.25 is the bound.
UNSEEN_AUC_BOUND = 0.25


def test_memorised_forget_set_looks_like_members(fact_world: FactWorld) -> None:
    sets = {"forget": fact_world.forget, "holdout": fact_world.holdout}
    reference = measure_sets(_base(fact_world), fact_world.tokenizer, sets)
    summary = evaluate(_tuned(fact_world), fact_world.tokenizer, sets, reference=reference)
    for key in ("mia_auc", "mia_auc_min_k", "mia_auc_zlib", "mia_auc_reference"):
        assert summary[key] >= 0.95, (key, summary[key])
    assert summary["privleak"] > 0.8
    assert summary["forget_exact_match"] == 1.0 and summary["forget_extraction_strength"] == 1.0
    assert summary["holdout_exact_match"] == 0.0


def test_a_model_that_saw_neither_set_cannot_tell_them_apart(fact_world: FactWorld) -> None:
    from tests.unlearn_world import facts

    sets = {"forget": TextDataset.from_pairs(facts(COUNTRIES[:10])),
            "holdout": TextDataset.from_pairs(facts(COUNTRIES[10:]))}
    base = _base(fact_world)
    summary = evaluate(base, fact_world.tokenizer, sets,
                       reference=measure_sets(base, fact_world.tokenizer, sets))
    for key in ("mia_auc", "mia_auc_min_k", "mia_auc_zlib"):
        assert abs(summary[key] - 0.5) <= UNSEEN_AUC_BOUND, (key, summary[key])
    assert abs(summary["privleak"]) <= UNSEEN_AUC_BOUND / 0.5
    assert summary["mia_auc_reference"] == 0.5  # its own reference: every score is 0


def _with_wrong_capitals(countries: list[str]) -> TextDataset:
    """Capital facts, each with the other 19 capitals as perturbed answers."""
    examples = []
    for country in countries:
        true = CAPITALS[COUNTRIES.index(country)]
        examples.append(Example(f"The capital of {country} is", true,
                                tuple(c for c in CAPITALS if c != true)))
    return TextDataset(examples, name="capitals")


# Bounds: the memorising model gives R about 3e-4, so 0.01 is well below 1 with room. The
# base model has idiosyncratic preferences among capitals for countries it never saw (per
# example log R has a spread of about 1.5), so "near 1" is checked on the geometric mean:
# |mean log R| came out 0.95 here and -0.8..0.9 when the "true" capital was shifted
# to each of the 20 others; 1.5 is the bound. (The arithmetic mean sits higher, about 5,
# by Jensen's inequality: why the summary reports the geometric mean.)
MEMORISED_TRUTH_RATIO = 0.01
UNSEEN_LOG_TRUTH_RATIO = 1.5


def test_truth_ratio_on_the_fact_world(fact_world: FactWorld) -> None:
    sets = {"forget": _with_wrong_capitals(FORGET + RETAIN)}
    tuned = summarize(measure_sets(_tuned(fact_world), fact_world.tokenizer, sets))
    assert tuned["forget_truth_ratio"] < MEMORISED_TRUTH_RATIO
    base = measure_sets(_base(fact_world), fact_world.tokenizer, sets)
    assert all(r is not None for r in base["forget"].truth_ratio)
    # the summary is the geometric mean: "no preference" reads near 1
    assert abs(math.log(summarize(base)["forget_truth_ratio"])) <= UNSEEN_LOG_TRUTH_RATIO
