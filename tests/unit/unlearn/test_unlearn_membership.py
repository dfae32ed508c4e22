"""Membership-inference scores and PrivLeak on numbers small enough to check by hand.

The same attacks on the fact world (memorised vs never seen) are in test_unlearn_metrics.py,
where they run through `evaluate`.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from lorafold.unlearn import membership, metrics
from lorafold.unlearn.membership import (
    MIN_K_FRACTION,
    min_k_scores,
    privleak,
    reference_scores,
    zlib_score,
)


def test_mia_auc_is_still_importable_from_metrics() -> None:
    assert metrics.mia_auc is membership.mia_auc


def test_min_k_averages_the_least_likely_fifth_of_masked_tokens() -> None:
    nll = torch.tensor([[0.1, 4.0, 0.2, 3.0, 0.3, 0.0, 99.0, 99.0, 99.0, 99.0],
                        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0],
                        [7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 6 + [False] * 4, [True] * 10, [True] + [False] * 9])
    assert MIN_K_FRACTION == 0.2
    # 6 tokens: k = 1 (the 99s are masked out); 10 tokens: k = 2; 1 token: k = 1
    assert min_k_scores(nll, mask).tolist() == pytest.approx([4.0, 9.5, 7.0])
    assert min_k_scores(nll, mask, fraction=0.5).tolist() == pytest.approx([
        (4.0 + 3.0 + 0.3) / 3, (10 + 9 + 8 + 7 + 6) / 5, 7.0])
    # a row without targets scores 0 rather than -inf
    assert min_k_scores(nll[:1], torch.zeros(1, 10, dtype=torch.bool)).tolist() == [0.0]


def test_zlib_score_divides_the_summed_nll_by_the_compressed_length() -> None:
    assert len(zlib.compress(b"abc")) == 11  # 2 header + 5 deflate + 4 checksum bytes
    assert zlib_score(22.0, "abc") == pytest.approx(2.0)
    assert zlib_score(6.0, "\u00e9") == pytest.approx(6.0 / len(zlib.compress(b"\xc3\xa9")))
    # same loss: the repetitive text (low zlib entropy) gets the larger, less member-like score
    assert zlib_score(10.0, "ab" * 40) > zlib_score(10.0, "the quick brown fox jumps over")


def test_reference_scores_subtract_per_example() -> None:
    assert reference_scores([1.0, 2.0], [3.0, 2.5]) == [-2.0, -0.5]
    with pytest.raises(ValueError):
        reference_scores([1.0, 2.0], [1.0])


def test_privleak_is_the_signed_relative_gap_to_the_reference_auc() -> None:
    assert privleak(0.75) == pytest.approx(0.5)     # under-unlearned: still looks like members
    assert privleak(0.25) == pytest.approx(-0.5)    # over-unlearned
    assert privleak(0.5) == 0.0
    assert privleak(0.9, reference_auc=0.6) == pytest.approx(0.5)
    assert privleak(1.0) == 1.0 and not math.isnan(privleak(0.0))
    with pytest.raises(ValueError):
        privleak(0.7, reference_auc=0.0)
