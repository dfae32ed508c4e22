"""Forgetting and utility metrics of a model on its forget/retain/holdout sets.

Per example: NLL, greedy exact match, extraction strength, the Min-K% and zlib
membership scores and, where the data carries wrong answers, TOFU's truth ratio; per set:
token accuracy; across forget and holdout: membership-inference AUCs and PrivLeak
(lorafold.unlearn.membership). All are computed on completion tokens only (labels !=
IGNORE_INDEX), in fp32 whatever the model's dtype, so that numbers from a bf16 GPU run and
an fp32 CPU run are comparable, and all come from one forward pass per batch (plus one
over the wrong answers for the truth ratio).
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from lorafold.unlearn.datasets import (
    IGNORE_INDEX,
    Batch,
    Example,
    TextDataset,
    Tokenizer,
    encode,
    make_batches,
    pad_id_of,
)
from lorafold.unlearn.membership import (
    mia_auc,
    min_k_scores,
    privleak,
    reference_scores,
    zlib_score,
)

logger = logging.getLogger(__name__)

Forward = Callable[[nn.Module, Batch], torch.Tensor]
Summary = dict[str, float | dict[str, float]]
QUANTILES = {"q10": 0.10, "q25": 0.25, "q50": 0.50, "q75": 0.75, "q90": 0.90}


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


@dataclass(frozen=True)
class ExampleStats(TokenStats):
    """TokenStats plus, per example, how much of the completion the model would reproduce."""

    exact: torch.Tensor  # bool: greedy decoding emits the whole completion
    extraction: torch.Tensor  # extraction strength in [0, 1]
    min_k: torch.Tensor  # Min-K% membership score


def _per_token(logits: torch.Tensor, labels: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob of each next target, whether it is a completion token, whether argmax hit it.

    Position t predicts labels[t + 1]; fp32 whatever the logits' dtype.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = targets.clamp(min=0)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    correct = (logits.argmax(dim=-1) == targets) & mask
    return logprobs, mask, correct


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> TokenStats:
    """Next-token statistics: position t predicts labels[t + 1]. Differentiable in logits."""
    logprobs, mask, correct = _per_token(logits, labels)
    return TokenStats(logprobs.sum(dim=1), mask.sum(dim=1), correct.sum(dim=1))


def exact_match(correct: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Whether greedy decoding from the prompt reproduces the whole completion, per row.

    Computed from the teacher-forced argmax, without generate(): greedy decoding emits the
    first completion token iff the argmax there is right, and having emitted it the next
    position sees the true prefix again; by induction over positions it reproduces the
    whole target iff every teacher-forced argmax on the completion is right.
    """
    return (correct | ~mask).all(dim=1) & mask.any(dim=1)


def extraction_strength(correct: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Extraction strength ES = 1 − k*/|y| per row (Carlini et al. 2021, "Extracting
    Training Data from Large Language Models"; as used in open-unlearning).

    k* is the shortest true prefix of the completion after which greedy decoding emits the
    rest: one past the last wrong teacher-forced argmax (0 when none is wrong). 1.0 = fully
    extractable from the prompt alone, 0.0 = not even the last token.
    """
    rank = mask.long().cumsum(dim=1)  # 1-based position among the completion tokens
    k_star = torch.where(mask & ~correct, rank, torch.zeros_like(rank)).amax(dim=1)
    n = mask.sum(dim=1)
    strength = 1.0 - k_star.float() / n.clamp(min=1).float()
    return torch.where(n > 0, strength, torch.zeros_like(strength))


def example_stats(logits: torch.Tensor, labels: torch.Tensor) -> ExampleStats:
    """Everything `measure` keeps per example, from one log-softmax over the logits."""
    logprobs, mask, correct = _per_token(logits, labels)
    return ExampleStats(logprobs.sum(dim=1), mask.sum(dim=1), correct.sum(dim=1),
                        exact=exact_match(correct, mask),
                        extraction=extraction_strength(correct, mask),
                        min_k=min_k_scores(-logprobs, mask))


def truth_ratio(true_nll: float, perturbed_nll: Sequence[float]) -> float:
    """TOFU's truth ratio (Maini et al. 2024, arXiv 2401.06121) from per-token-mean NLLs.

    R = exp(nll_true − mean_j nll_perturbed_j): the geometric mean probability of the wrong
    answers over that of the true one, as TOFU's code computes it. R < 1: the model prefers
    the true answer; R ≈ 1: it has no preference (what forgetting should leave).
    """
    if not perturbed_nll:
        raise ValueError("truth_ratio needs at least one perturbed answer")
    return math.exp(true_nll - statistics.fmean(perturbed_nll))


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
    """Per-example statistics of one data set, in data set order, plus token accuracy."""

    nll: list[float]
    n_tokens: int
    n_correct: int
    exact: list[bool]
    extraction: list[float]
    min_k: list[float]
    zlib: list[float] | None  # None when measured without the completion texts
    truth_ratio: list[float | None]  # None where an example has no perturbed answers

    @property
    def mean_nll(self) -> float:
        return sum(self.nll) / len(self.nll)

    @property
    def accuracy(self) -> float:
        return self.n_correct / self.n_tokens if self.n_tokens else 0.0

    @property
    def exact_match(self) -> float:
        return sum(self.exact) / len(self.exact)

    @property
    def extraction_strength(self) -> float:
        return statistics.fmean(self.extraction)

    @property
    def mean_truth_ratio(self) -> float | None:
        """Geometric mean over the examples that have one; None when none has.

        R is a ratio of probabilities: its arithmetic mean is pulled far above 1 by a few
        large values even for a model with no preference; the geometric mean reads 1 then.
        """
        logs = [math.log(r) for r in self.truth_ratio if r is not None and r > 0]
        return math.exp(statistics.fmean(logs)) if logs else None


class _Row(NamedTuple):
    position: int  # in the data set
    nll: float
    nll_sum: float
    exact: bool
    extraction: float
    min_k: float


def _rows(index: torch.Tensor, stats: ExampleStats) -> list[_Row]:
    columns = (index, stats.nll, -stats.logprob_sum, stats.exact, stats.extraction, stats.min_k)
    return [_Row(*values) for values in zip(*(c.tolist() for c in columns), strict=True)]


@torch.no_grad()
def measure(model: nn.Module, batches: Iterable[Batch], forward: Forward = logits_of, *,
            completions: Sequence[str] | None = None) -> SetMetrics:
    """Per-example statistics and pooled token accuracy of `model` over `batches`.

    One forward pass per batch. `completions` (the data set's completion texts, by example
    index) adds the zlib score; the texts are whole even where `encode` truncated the
    tokens. Truth ratios are left None: they need the data set (see `measure_sets`).
    """
    device = model_device(model)
    rows: list[_Row] = []
    n_tokens = n_correct = 0
    for batch in batches:
        batch = batch.to(device)
        with autocast_for(device):
            logits = forward(model, batch)
        stats = example_stats(logits, batch.labels)
        rows.extend(_rows(batch.index, stats))
        n_tokens += int(stats.n_tokens.sum())
        n_correct += int(stats.n_correct.sum())
    rows.sort(key=lambda row: row.position)  # back to dataset order whatever the batching
    zlib = None
    if completions is not None:
        zlib = [zlib_score(row.nll_sum, completions[row.position]) for row in rows]
    return SetMetrics([r.nll for r in rows], n_tokens, n_correct, [r.exact for r in rows],
                      [r.extraction for r in rows], [r.min_k for r in rows], zlib,
                      [None] * len(rows))


def _batches(tokenizer: Tokenizer, dataset: TextDataset, *, batch_size: int,
             max_length: int) -> list[Batch]:
    return make_batches(encode(tokenizer, dataset, max_length=max_length),
                        batch_size=batch_size, pad_id=pad_id_of(tokenizer))


def _truth_ratios(model: nn.Module, tokenizer: Tokenizer, dataset: TextDataset,
                  true_nll: Sequence[float], *, batch_size: int, max_length: int,
                  forward: Forward) -> list[float | None]:
    """Score every (prompt, perturbed answer) pair in batches; one ratio per example."""
    owners = [i for i, example in enumerate(dataset) for _ in example.perturbed]
    pairs = TextDataset([Example(example.prompt, answer)
                         for example in dataset for answer in example.perturbed],
                        name=f"{dataset.name or 'dataset'} (perturbed)")
    scored = measure(model, _batches(tokenizer, pairs, batch_size=batch_size,
                                     max_length=max_length), forward).nll
    grouped: dict[int, list[float]] = {}
    for owner, nll in zip(owners, scored, strict=True):
        grouped.setdefault(owner, []).append(nll)
    return [truth_ratio(true_nll[i], grouped[i]) if i in grouped else None
            for i in range(len(dataset))]


def _measure_set(model: nn.Module, tokenizer: Tokenizer, dataset: TextDataset, *,
                 batch_size: int, max_length: int, forward: Forward) -> SetMetrics:
    batches = _batches(tokenizer, dataset, batch_size=batch_size, max_length=max_length)
    metrics = measure(model, batches, forward, completions=[e.completion for e in dataset])
    if not any(example.perturbed for example in dataset):
        return metrics
    ratios = _truth_ratios(model, tokenizer, dataset, metrics.nll, batch_size=batch_size,
                           max_length=max_length, forward=forward)
    return replace(metrics, truth_ratio=ratios)


def measure_sets(model: nn.Module, tokenizer: Tokenizer, datasets: Mapping[str, TextDataset],
                 *, batch_size: int = 16, max_length: int = 512,
                 forward: Forward = logits_of) -> dict[str, SetMetrics]:
    """`measure` every non-empty set (with zlib scores and truth ratios) in eval mode.

    The model's training mode is restored afterwards. `forward(model, batch) -> logits`
    lets a caller route through its own module (e.g. the base model alone, to measure the
    reference for `summarize`).
    """
    was_training = model.training
    model.eval()
    try:
        return {name: _measure_set(model, tokenizer, ds, batch_size=batch_size,
                                   max_length=max_length, forward=forward)
                for name, ds in datasets.items() if len(ds)}
    finally:
        model.train(was_training)


def nll_quantiles(values: Sequence[float]) -> dict[str, float]:
    """q10..q90 by linear interpolation: the spread a mean hides (a few facts kept)."""
    levels = torch.tensor(list(QUANTILES.values()), dtype=torch.float64)
    found = torch.quantile(torch.tensor(values, dtype=torch.float64), levels)
    return dict(zip(QUANTILES, found.tolist(), strict=True))


def _set_summary(name: str, m: SetMetrics) -> dict[str, float]:
    out = {f"{name}_nll": m.mean_nll, f"{name}_accuracy": m.accuracy,
           f"{name}_exact_match": m.exact_match,
           f"{name}_extraction_strength": m.extraction_strength}
    if (ratio := m.mean_truth_ratio) is not None:
        out[f"{name}_truth_ratio"] = ratio
    return out


def _membership(forget: SetMetrics, holdout: SetMetrics,
                reference: Mapping[str, SetMetrics] | None) -> dict[str, float]:
    """Attack AUCs with forget as members and holdout as non-members, and PrivLeak."""
    out = {"mia_auc": mia_auc(forget.nll, holdout.nll),
           "mia_auc_min_k": mia_auc(forget.min_k, holdout.min_k)}
    if forget.zlib is not None and holdout.zlib is not None:
        out["mia_auc_zlib"] = mia_auc(forget.zlib, holdout.zlib)
    out["privleak"] = privleak(out["mia_auc_min_k"])
    if reference is not None and "forget" in reference and "holdout" in reference:
        out["mia_auc_reference"] = mia_auc(
            reference_scores(forget.nll, reference["forget"].nll),
            reference_scores(holdout.nll, reference["holdout"].nll))
    return out


def summarize(sets: Mapping[str, SetMetrics], *,
              reference: Mapping[str, SetMetrics] | None = None) -> Summary:
    """Per set `<name>_nll`, `_accuracy`, `_exact_match`, `_extraction_strength` (and
    `_truth_ratio` where measured); `forget_nll_quantiles`; membership AUCs and `privleak`
    when forget and holdout are both there (`mia_auc_reference` needs `reference`: the same
    sets measured on the base model alone). Plain floats, ready for JSON.
    """
    out: Summary = {}
    for name, m in sets.items():
        out.update(_set_summary(name, m))
    if "forget" in sets:
        out["forget_nll_quantiles"] = nll_quantiles(sets["forget"].nll)
    if "forget" in sets and "holdout" in sets:
        out.update(_membership(sets["forget"], sets["holdout"], reference))
    return out


def evaluate(model: nn.Module, tokenizer: Tokenizer, datasets: Mapping[str, TextDataset], *,
             batch_size: int = 16, max_length: int = 512,
             reference: Mapping[str, SetMetrics] | None = None) -> Summary:
    """`summarize` of the model as it is now on every non-empty set (see `measure_sets`)."""
    return summarize(measure_sets(model, tokenizer, datasets, batch_size=batch_size,
                                  max_length=max_length), reference=reference)
