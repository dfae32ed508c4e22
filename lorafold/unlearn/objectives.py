"""The four data-driven unlearning methods as small loss functions, and their registry.

Each loss takes the model, one forget batch (and a retain batch when the method uses one)
and returns a scalar to *minimise*. `METHODS` is the one place a method is declared, with
its defaults and what it needs, so a request is validated before any model is loaded.

`feature_alignment` is our reconstruction of "Machine Unlearning on Pre-trained Models by
Residual Feature Alignment Using LoRA" (Qin et al., arXiv 2411.08443) from its abstract:
a fresh LoRA residual on top of base + original adapter learns *zero residuals* on the
retain set (hidden states stay those of the original) and *shifted residuals* on the forget
set. The paper's exact forget-set target is not known to us; we shift the forget set's
hidden states to those of the base model with the original adapter switched off, i.e. to
what the model was before it learned the forget set.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lorafold.errors import InvalidRequest
from lorafold.unlearn.datasets import IGNORE_INDEX, Batch
from lorafold.unlearn.metrics import token_stats
from lorafold.unlearn.model import UnlearnModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hyperparams:
    """Training knobs. Defaults per method live in METHODS; see `resolve_hyperparams`."""

    lr: float = 1e-4
    max_steps: int = 100
    batch_size: int = 8
    retain_weight: float = 1.0     # grad_diff, npo (when a retain set is given), feature_alignment
    forget_weight: float = 1.0     # feature_alignment
    beta: float = 0.1              # npo inverse temperature
    layers: tuple[int, ...] | None = None  # feature_alignment: decoder layers (1..L, or -1..-L)
    residual_rank: int | None = None       # feature_alignment: None = the original's rank
    consolidation_beta: float = 0.0  # feature_alignment: CtM β of the consolidation (0: balanced)
    eval_every: int = 5            # gold-free stopping check period (steps)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    max_length: int = 512

    def validate(self) -> Hyperparams:
        checks = [
            (self.lr > 0, "lr must be > 0"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.retain_weight >= 0, "retain_weight must be >= 0"),
            (self.forget_weight > 0, "forget_weight must be > 0"),
            (self.beta > 0, "beta must be > 0"),
            (0.0 <= self.consolidation_beta <= 1.0, "consolidation_beta must be in [0, 1]"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.max_grad_norm > 0, "max_grad_norm must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.max_length >= 2, "max_length must be >= 2"),
            (self.residual_rank is None or self.residual_rank >= 1,
             "residual_rank must be >= 1"),
            (self.layers is None or len(self.layers) > 0, "layers must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(f"hyperparameters: {message}", code="invalid_hyperparameters")
        return self


@dataclass(frozen=True)
class StepInputs:
    """What one optimisation step sees."""

    forget: Batch
    retain: Batch | None
    reference: torch.Tensor | None = None  # npo: log p_ref(y|x) per forget example (by index)
    layers: Sequence[int] = ()             # feature_alignment: hidden_states indices


LossFn = Callable[[UnlearnModel, StepInputs, Hyperparams], tuple[torch.Tensor, dict[str, float]]]


def _f(value: torch.Tensor) -> float:
    """A loss term as a plain float for the log, without touching its graph."""
    return float(value.detach())


def _nll(model: UnlearnModel, batch: Batch) -> torch.Tensor:
    return token_stats(model(batch).logits, batch.labels).nll.mean()


def gradient_ascent(model: UnlearnModel, inputs: StepInputs,
                    hp: Hyperparams) -> tuple[torch.Tensor, dict[str, float]]:
    """Maximise the forget set's NLL. Unbounded: the stopping rule and clipping keep it sane."""
    forget_nll = _nll(model, inputs.forget)
    return -forget_nll, {"forget_nll": _f(forget_nll)}


def grad_diff(model: UnlearnModel, inputs: StepInputs,
              hp: Hyperparams) -> tuple[torch.Tensor, dict[str, float]]:
    """Ascent on forget, descent on retain: the retain term anchors what should stay."""
    forget_nll = _nll(model, inputs.forget)
    loss = -forget_nll
    logs = {"forget_nll": _f(forget_nll)}
    if inputs.retain is not None:
        retain_nll = _nll(model, inputs.retain)
        loss = loss + hp.retain_weight * retain_nll
        logs["retain_nll"] = _f(retain_nll)
    return loss, logs


def npo(model: UnlearnModel, inputs: StepInputs,
        hp: Hyperparams) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative Preference Optimization (Zhang et al. 2024): -(2/β)·log σ(-β·(log p_θ - log p_ref)).

    Bounded below, so unlike plain ascent it slows down once the forget set is unlikely.
    Log-probabilities are summed over completion tokens (sequence likelihood).
    """
    if inputs.reference is None:
        raise RuntimeError("npo needs reference log-probabilities")
    stats = token_stats(model(inputs.forget).logits, inputs.forget.labels)
    ratio = stats.logprob_sum - inputs.reference[inputs.forget.index]
    loss = -(2.0 / hp.beta) * F.logsigmoid(-hp.beta * ratio).mean()
    logs = {"npo": _f(loss), "forget_nll": _f(stats.nll.mean())}
    if inputs.retain is not None and hp.retain_weight > 0:
        retain_nll = _nll(model, inputs.retain)
        loss = loss + hp.retain_weight * retain_nll
        logs["retain_nll"] = _f(retain_nll)
    return loss, logs


def answer_positions(batch: Batch) -> torch.Tensor:
    """Positions whose next token is a target: where the forget set's answers are produced.

    Earlier positions (a template shared with retained facts, "The capital of") are left to
    the retain term; aligning them to the base model too would fight it.
    """
    mask = torch.zeros_like(batch.labels, dtype=torch.bool)
    mask[:, :-1] = batch.labels[:, 1:] != IGNORE_INDEX
    return mask


def _relative_mse(hidden: Sequence[torch.Tensor], target: Sequence[torch.Tensor],
                  layers: Sequence[int], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of ‖h − t‖² / ‖t‖² on masked positions (scale-free across layers)."""
    terms = []
    for layer in layers:
        h, t = hidden[layer][mask].float(), target[layer][mask].float()
        terms.append((h - t).pow(2).sum() / t.pow(2).sum().clamp(min=1e-8))
    return torch.stack(terms).mean()


def feature_alignment(model: UnlearnModel, inputs: StepInputs,
                      hp: Hyperparams) -> tuple[torch.Tensor, dict[str, float]]:
    """Residual feature alignment (reconstruction, see module doc).

    forget: hidden states with the residual → hidden states of the base model alone;
    retain: hidden states with the residual → those without it (zero residual effect).
    The loss is bounded (it converges to the base model's behaviour on the forget set), so
    it cannot over-unlearn the way ascent can; the holdout stopping rule then fires only if
    the base model finds the forget set as unlikely as the holdout set, so this method
    mostly runs its `max_steps`.
    """
    forget = inputs.forget
    with torch.no_grad(), model.view("base"):
        forget_target = model(forget, hidden_states=True).hidden_states
    forget_hidden = model(forget, hidden_states=True).hidden_states
    forget_term = _relative_mse(forget_hidden, forget_target, inputs.layers,
                                answer_positions(forget))
    loss = hp.forget_weight * forget_term
    logs = {"forget_alignment": _f(forget_term)}
    if inputs.retain is not None:
        retain = inputs.retain
        with torch.no_grad(), model.view("original"):
            retain_target = model(retain, hidden_states=True).hidden_states
        retain_hidden = model(retain, hidden_states=True).hidden_states
        retain_term = _relative_mse(retain_hidden, retain_target, inputs.layers,
                                    retain.attention_mask.bool())
        loss = loss + hp.retain_weight * retain_term
        logs["retain_alignment"] = _f(retain_term)
    return loss, logs


@dataclass(frozen=True)
class MethodSpec:
    """A method: its loss, its defaults, and what it needs from the request."""

    name: str
    loss: LossFn
    defaults: Hyperparams
    trains: Literal["original", "residual"]  # which LoRA factors are optimised
    needs_retain: bool = False
    uses_retain: bool = True       # False: a retain set is only measured, never trained on
    needs_reference: bool = False
    summary: str = ""


METHODS: dict[str, MethodSpec] = {
    "gradient_ascent": MethodSpec(
        "gradient_ascent", gradient_ascent, Hyperparams(lr=1e-4, max_steps=100),
        trains="original", uses_retain=False, summary="maximise forget-set NLL"),
    "grad_diff": MethodSpec(
        "grad_diff", grad_diff, Hyperparams(lr=1e-4, max_steps=200),
        trains="original", needs_retain=True,
        summary="ascent on forget + descent on retain"),
    "npo": MethodSpec(
        "npo", npo, Hyperparams(lr=1e-4, max_steps=200, beta=0.1),
        trains="original", needs_reference=True,
        summary="negative preference optimisation against base + original adapter"),
    "feature_alignment": MethodSpec(
        "feature_alignment", feature_alignment, Hyperparams(lr=1e-3, max_steps=300),
        trains="residual", needs_retain=True,
        summary="residual LoRA: zero effect on retain, base-model features on forget "
                "(reconstruction of arXiv 2411.08443)"),
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidRequest(f"unknown unlearning method {name!r}; supported: "
                             f"{', '.join(sorted(METHODS))}",
                             code="unknown_unlearning_method") from None


def resolve_hyperparams(method: str, given: Hyperparams | Mapping[str, Any] | None = None
                        ) -> Hyperparams:
    """The method's defaults overridden by `given` (a dict from a request, or a dataclass)."""
    spec = get_method(method)
    if given is None:
        return spec.defaults.validate()
    if isinstance(given, Hyperparams):
        return given.validate()
    known = {f.name for f in dataclasses.fields(Hyperparams)}
    unknown = sorted(set(given) - known)
    if unknown:
        hint = (" (balance was replaced by consolidation_beta: 0 = balanced, 1 = as they are)"
                if "balance" in unknown else "")
        raise InvalidRequest(f"hyperparameters: unknown {', '.join(unknown)}{hint}; known: "
                             f"{', '.join(sorted(known))}", code="invalid_hyperparameters")
    values = dict(given)
    if values.get("layers") is not None:
        values["layers"] = tuple(int(v) for v in values["layers"])
    for field in dataclasses.fields(Hyperparams):
        if field.name in values and field.name != "layers" and values[field.name] is not None:
            default = getattr(spec.defaults, field.name)
            kind = type(default) if default is not None else int
            if kind is bool:
                if not isinstance(values[field.name], bool):
                    raise InvalidRequest(f"hyperparameters: {field.name} must be true or false",
                                         code="invalid_hyperparameters")
                continue
            if isinstance(values[field.name], bool):
                raise InvalidRequest(f"hyperparameters: {field.name} must be a "
                                     f"{kind.__name__}, got {values[field.name]!r}",
                                     code="invalid_hyperparameters")
            try:
                if kind is int and not float(values[field.name]).is_integer():
                    raise ValueError
                values[field.name] = kind(values[field.name])
            except (TypeError, ValueError):
                raise InvalidRequest(f"hyperparameters: {field.name} must be a "
                                     f"{kind.__name__}, got {values[field.name]!r}",
                                     code="invalid_hyperparameters") from None
    return dataclasses.replace(spec.defaults, **values).validate()


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """hidden_states indices (0 is the embeddings; 1..L the decoder layers' outputs)."""
    if layers is None:
        return list(range(1, num_layers + 1))
    resolved = []
    for layer in layers:
        index = layer + num_layers + 1 if layer < 0 else layer
        if not 1 <= index <= num_layers:
            raise InvalidRequest(f"hyperparameters: layer {layer} is out of range for a model "
                                 f"with {num_layers} layers (use 1..{num_layers} or -1..-"
                                 f"{num_layers})", code="invalid_hyperparameters")
        resolved.append(index)
    return sorted(set(resolved))
