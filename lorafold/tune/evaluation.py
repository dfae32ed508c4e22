"""Validation of base + candidate: mean NLL (the loss tuning minimises) and token accuracy.

The sets are the unlearning data sets' JSONL (lorafold.unlearn.datasets), tokenised and
batched once. The loss is the mean over sets of each set's mean per-example NLL on
completion tokens, so with one set per input every task counts the same however many
examples it has. Measured with the unlearning metrics (`measure`: fp32 statistics, bf16
autocast on CUDA); `batch_loss` is the differentiable twin for learned weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorafold.unlearn.datasets import (
    Batch,
    TextDataset,
    Tokenizer,
    encode,
    make_batches,
    pad_id_of,
)
from lorafold.unlearn.metrics import autocast_for, logits_of, measure, token_stats


@dataclass(frozen=True)
class Score:
    loss: float                  # mean over sets of the mean per-example NLL
    accuracy: float              # mean over sets of the token accuracy
    per_set: list[dict[str, Any]]

    def to_dict(self) -> dict[str, object]:
        return {"loss": self.loss, "accuracy": self.accuracy, "per_set": self.per_set}


@dataclass(frozen=True)
class ValidationSets:
    """Tokenised, batched validation sets on the model's device."""

    names: list[str]
    batches: list[list[Batch]]
    sizes: list[int]

    @classmethod
    def build(cls, tokenizer: Tokenizer, datasets: Sequence[TextDataset], *,
              device: torch.device, max_length: int, batch_size: int) -> ValidationSets:
        pad = pad_id_of(tokenizer)
        batches = [[b.to(device) for b in make_batches(
            encode(tokenizer, ds, max_length=max_length), batch_size=batch_size, pad_id=pad)]
            for ds in datasets]
        names = [ds.name or f"set{i}" for i, ds in enumerate(datasets)]
        return cls(names, batches, [len(ds) for ds in datasets])

    def score(self, model: nn.Module) -> Score:
        """One no-grad pass over every set."""
        per_set: list[dict[str, Any]] = []
        for name, batches in zip(self.names, self.batches, strict=True):
            metrics = measure(model, batches)
            per_set.append({"name": name, "nll": metrics.mean_nll,
                            "accuracy": metrics.accuracy})
        loss = sum(float(s["nll"]) for s in per_set) / len(per_set)
        accuracy = sum(float(s["accuracy"]) for s in per_set) / len(per_set)
        return Score(loss, accuracy, per_set)

    def backward(self, model: nn.Module) -> float:
        """The same loss with gradients: backward per batch (memory of one batch's
        activations), returning the loss value."""
        device = next(model.parameters()).device
        total = 0.0
        for batches, size in zip(self.batches, self.sizes, strict=True):
            for batch in batches:
                with autocast_for(device):
                    logits = logits_of(model, batch)
                nll = token_stats(logits, batch.labels).nll.sum() / (size * len(self.sizes))
                nll.backward()
                total += float(nll.detach())
        return total
