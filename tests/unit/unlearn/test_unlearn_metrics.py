"""NLL, token accuracy and the loss-attack AUC on examples small enough to do by hand."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lorafold.unlearn.datasets import IGNORE_INDEX, TextDataset
from lorafold.unlearn.metrics import evaluate, mia_auc, token_stats
from tests.unlearn_world import FactWorld


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
    assert set(result) == {"forget_nll", "forget_accuracy", "holdout_nll", "holdout_accuracy",
                           "mia_auc"}
    assert all(math.isfinite(v) for v in result.values())
    assert 0.0 <= result["forget_accuracy"] <= 1.0
