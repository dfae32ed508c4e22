"""Unlearning hyperparameters: one typed record, and the coercion of a request's JSON into it.

Defaults per method live in `lorafold.unlearn.objectives.METHODS`; this module only knows
the fields, their types and their ranges, so that every wrong value — a string where a
number belongs, `layers: 5`, a NaN — is an `invalid_hyperparameters` refusal, never a 500.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorafold.errors import InvalidRequest

FORGET_LOSSES = ("ascent", "ihl")


@dataclass(frozen=True)
class Hyperparams:
    """Training knobs. Defaults per method live in METHODS; see `resolve_hyperparams`."""

    lr: float = 1e-4
    max_steps: int = 100
    batch_size: int = 8
    retain_weight: float = 1.0     # grad_diff, ihl, npo, simnpo, feature_alignment
    forget_weight: float = 1.0     # feature_alignment
    forget_loss: str = "ascent"    # grad_diff: ascent (−NLL) or ihl (inverted hinge)
    beta: float = 0.1              # npo / simnpo inverse temperature
    delta: float | None = None     # simnpo: target NLL (None: the original's holdout NLL)
    layers: tuple[int, ...] | None = None  # feature_alignment: decoder layers (1..L, or -1..-L)
    residual_rank: int | None = None       # feature_alignment: None = the original's rank
    output_rank: int | None = None  # feature_alignment: None = exact (r_original + r_residual)
    consolidation_beta: float = 0.0  # feature_alignment, lossy output only: CtM β
    eval_every: int = 5            # gold-free stopping check period (steps)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    max_length: int = 512
    relearn_probe_steps: int = 0   # robustness probe: 0 = off
    quantization_probe: bool = False
    probe_time_limit_s: float = 120.0  # per probe

    def validate(self) -> Hyperparams:
        checks = [
            (self.lr > 0, "lr must be > 0"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.retain_weight >= 0, "retain_weight must be >= 0"),
            (self.forget_weight > 0, "forget_weight must be > 0"),
            (self.forget_loss in FORGET_LOSSES,
             f"forget_loss must be one of {', '.join(FORGET_LOSSES)}"),
            (self.beta > 0, "beta must be > 0"),
            (0.0 <= self.consolidation_beta <= 1.0, "consolidation_beta must be in [0, 1]"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.max_grad_norm > 0, "max_grad_norm must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.max_length >= 2, "max_length must be >= 2"),
            (self.residual_rank is None or self.residual_rank >= 1,
             "residual_rank must be >= 1"),
            (self.output_rank is None or self.output_rank >= 1, "output_rank must be >= 1"),
            (self.layers is None or len(self.layers) > 0, "layers must not be empty"),
            (self.relearn_probe_steps >= 0, "relearn_probe_steps must be >= 0"),
            (self.probe_time_limit_s > 0, "probe_time_limit_s must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise invalid(message)
        return self


def invalid(message: str) -> InvalidRequest:
    return InvalidRequest(f"hyperparameters: {message}", code="invalid_hyperparameters")


def _number(name: str, value: Any, kind: type) -> int | float:
    """An int or a float from JSON; booleans and strings of digits are not numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, str):
            try:  # the CLI passes key=value strings
                value = float(value)
            except ValueError:
                raise invalid(f"{name} must be a {kind.__name__}, got {value!r}") from None
        else:
            raise invalid(f"{name} must be a {kind.__name__}, got {value!r}")
    if not math.isfinite(value):
        raise invalid(f"{name} must be a finite number, got {value!r}")
    if kind is int:
        if not float(value).is_integer():
            raise invalid(f"{name} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` as the field's type, or an invalid_hyperparameters refusal."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:  # X | None
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise invalid(f"{name} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise invalid(f"{name} must be a string, got {value!r}")
        return value
    if hint in (int, float):
        return _number(name, value, hint)
    if typing.get_origin(hint) is tuple:  # tuple[int, ...]
        if not isinstance(value, list | tuple):
            raise invalid(f"{name} must be a list of integers, got {value!r}")
        return tuple(_number(name, v, args[0]) for v in value)
    raise TypeError(f"no coercion for hyperparameter {name}: {hint}")


_HINTS = typing.get_type_hints(Hyperparams)


def override(defaults: Hyperparams, given: Mapping[str, Any]) -> Hyperparams:
    """`defaults` with the request's values, each checked against its field's type."""
    known = {f.name for f in dataclasses.fields(Hyperparams)}
    unknown = sorted(str(k) for k in given if k not in known)
    if unknown:
        hint = (" (balance was replaced by consolidation_beta: 0 = balanced, 1 = as they are)"
                if "balance" in unknown else "")
        raise invalid(f"unknown {', '.join(unknown)}{hint}; known: {', '.join(sorted(known))}")
    values = {name: _coerce(name, value, _HINTS[name]) for name, value in given.items()}
    return dataclasses.replace(defaults, **values).validate()
