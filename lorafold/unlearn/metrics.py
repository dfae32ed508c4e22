"""Forgetting and utility metrics: per-example NLL, token accuracy, loss-attack MIA AUC.

All are computed on completion tokens only (labels != IGNORE_INDEX), in fp32 whatever the
model's dtype, so that numbers from a bf16 GPU run and an fp32 CPU run are comparable.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorafold.unlearn.datasets import (
    IGNORE_INDEX,
    Batch,
    TextDataset,
    Tokenizer,
    encode,
    make_batches,
    pad_id_of,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenStats:
    """Per example: summed log-prob, number and number correct of completion tokens."""

    logprob_sum: torch.Tensor
    n_tokens: torch.Tensor
    n_correct: torch.Tensor

    @property
    def nll(self) -> torch.Tensor:
        """Mean NLL per completion token, per example (so long answers do not dominate)."""
        return -self.logprob_sum / self.n_tokens.clamp(min=1)


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> TokenStats:
    """Next-token statistics: position t predicts labels[t + 1]. Differentiable in logits."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = targets.clamp(min=0)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    correct = (logits.argmax(dim=-1) == targets) & mask
    return TokenStats(logprobs.sum(dim=1), mask.sum(dim=1), correct.sum(dim=1))


def mia_auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """AUC of the loss attack "lower loss means member" (Mann–Whitney U, ties count half).

    1.0: every forget example has a lower loss than every holdout one (the model still
    remembers); 0.5: the attacker cannot tell them apart.
    """
    if not members or not nonmembers:
        raise ValueError("mia_auc needs at least one member and one non-member loss")
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
    u_nonmember = nonmember_rank_sum - n_n * (n_n + 1) / 2  # pairs with nonmember loss higher
    return u_nonmember / (n_m * n_n)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA (where it is fast and safe for LoRA), nothing elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def logits_of(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits: torch.Tensor = out.logits
    return logits


@dataclass(frozen=True)
class SetMetrics:
    """Per-example NLLs plus token accuracy of one data set."""

    nll: list[float]
    n_tokens: int
    n_correct: int

    @property
    def mean_nll(self) -> float:
        return sum(self.nll) / len(self.nll)

    @property
    def accuracy(self) -> float:
        return self.n_correct / self.n_tokens if self.n_tokens else 0.0


@torch.no_grad()
def measure(model: nn.Module, batches: Iterable[Batch],
            forward: Callable[[nn.Module, Batch], torch.Tensor] = logits_of) -> SetMetrics:
    """Per-example NLL and pooled token accuracy of `model` over `batches`."""
    device = model_device(model)
    nll: list[tuple[int, float]] = []
    n_tokens = n_correct = 0
    for batch in batches:
        batch = batch.to(device)
        with autocast_for(device):
            logits = forward(model, batch)
        stats = token_stats(logits, batch.labels)
        nll.extend(zip(batch.index.tolist(), stats.nll.tolist(), strict=True))
        n_tokens += int(stats.n_tokens.sum())
        n_correct += int(stats.n_correct.sum())
    nll.sort()  # back to dataset order whatever the batching
    return SetMetrics([v for _, v in nll], n_tokens, n_correct)


def summarize(sets: Mapping[str, SetMetrics]) -> dict[str, float]:
    """`<name>_nll` and `<name>_accuracy` per set, plus `mia_auc` (forget vs holdout)."""
    out: dict[str, float] = {}
    for name, m in sets.items():
        out[f"{name}_nll"] = m.mean_nll
        out[f"{name}_accuracy"] = m.accuracy
    if "forget" in sets and "holdout" in sets:
        out["mia_auc"] = mia_auc(sets["forget"].nll, sets["holdout"].nll)
    return out


def evaluate(model: nn.Module, tokenizer: Tokenizer, datasets: Mapping[str, TextDataset], *,
             batch_size: int = 16, max_length: int = 512) -> dict[str, float]:
    """Forget/retain/holdout NLL and token accuracy (and MIA AUC) of the model as it is now."""
    was_training = model.training
    model.eval()
    try:
        pad_id = pad_id_of(tokenizer)
        sets = {name: measure(model, make_batches(encode(tokenizer, ds, max_length=max_length),
                                                  batch_size=batch_size, pad_id=pad_id))
                for name, ds in datasets.items() if len(ds)}
    finally:
        model.train(was_training)
    return summarize(sets)
