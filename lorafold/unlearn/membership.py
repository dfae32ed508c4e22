"""Membership inference: per-example attack scores, their AUC, and MUSE's PrivLeak.

Every score follows one convention, "lower score means member", so that one AUC
(`mia_auc`) serves every attack: 1.0 means the forget set (members) still looks trained on,
0.5 that the attacker cannot tell it from the holdout set (non-members).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

MIN_K_FRACTION = 0.2  # Min-K%: the share of least likely tokens that is averaged


def mia_auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """AUC of the attack "lower score means member" (Mann–Whitney U, ties count half).

    1.0: every forget example scores lower than every holdout one (the model still
    remembers); 0.5: the attacker cannot tell them apart.
    """
    if not members or not nonmembers:
        raise ValueError("mia_auc needs at least one member and one non-member score")
    pooled = sorted([(float(v), 0) for v in members] + [(float(v), 1) for v in nonmembers])
    nonmember_rank_sum = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j < len(pooled) and pooled[j][0] == pooled[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2  # 1-based ranks i+1..j share their average
        nonmember_rank_sum += mean_rank * sum(1 for _, kind in pooled[i:j] if kind == 1)
        i = j
    n_m, n_n = len(members), len(nonmembers)
    u_nonmember = nonmember_rank_sum - n_n * (n_n + 1) / 2  # pairs with nonmember score higher
    return u_nonmember / (n_m * n_n)


def min_k_scores(token_nll: torch.Tensor, mask: torch.Tensor, *,
                 fraction: float = MIN_K_FRACTION) -> torch.Tensor:
    """Min-K% Prob (Shi et al. 2023, arXiv 2310.16789), per row of [examples, positions].

    The mean NLL of the `fraction` least likely target tokens (at least one): a text seen in
    training has few very surprising tokens, whatever its overall difficulty. Positions
    where `mask` is False count for nothing.
    """
    n = mask.sum(dim=1)
    k = torch.clamp((n * fraction).floor().long(), min=1)
    ranked = torch.where(mask, token_nll, torch.full_like(token_nll, -torch.inf))
    ranked = ranked.sort(dim=1, descending=True).values
    chosen = torch.arange(ranked.shape[1], device=ranked.device).unsqueeze(0) < k.unsqueeze(1)
    chosen &= ranked.isfinite()  # a row without targets scores 0, not -inf
    summed = torch.where(chosen, ranked, torch.zeros_like(ranked)).sum(dim=1)
    return summed / k


def zlib_score(nll_sum: float, text: str) -> float:
    """Summed NLL (nats) over the zlib-compressed length in bytes (Carlini et al. 2021).

    Dividing by zlib entropy discounts texts that are low-loss because they are simply
    repetitive or generic, not because they were trained on.
    """
    return nll_sum / len(zlib.compress(text.encode("utf-8")))


def reference_scores(nll: Sequence[float], reference_nll: Sequence[float]) -> list[float]:
    """Reference attack: NLL minus the NLL under a reference model, per example.

    Subtracting what a model that never saw the data already finds easy leaves what training
    added (the base model is the natural reference for an adapter).
    """
    if len(nll) != len(reference_nll):
        raise ValueError(f"{len(nll)} scores but {len(reference_nll)} reference scores")
    return [float(a) - float(b) for a, b in zip(nll, reference_nll, strict=True)]


def privleak(auc: float, reference_auc: float = 0.5) -> float:
    """MUSE's PrivLeak (Shi et al. 2024, arXiv 2407.06460) as a ratio, not a percentage.

    (AUC − AUC_retrained) / AUC_retrained on the Min-K% AUC: > 0 under-unlearned (the forget
    set still looks like members), < 0 over-unlearned (it looks *less* like members than
    data never seen). MUSE measures AUC_retrained on a model retrained without the forget
    set; a service has none, so the default 0.5 stands in for it: a model that saw neither
    set cannot tell them apart.
    """
    if reference_auc <= 0.0:
        raise ValueError(f"reference_auc must be > 0, got {reference_auc}")
    return (auc - reference_auc) / reference_auc
