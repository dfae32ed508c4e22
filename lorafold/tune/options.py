"""What a tuning request may ask for, as plain values (no torch), checked up front.

A tuned merge searches over named parameters of a `MergeRequest`:

- lambda   the global scale λ (`scale`), every method
- beta     CtM's rescaling β, method ctm
- density  the ties trim, rules ties and dare_ties
- drop     dare's drop rate, rules dare and dare_ties
- weights  one weight per input, learned by gradient descent (rule ta, methods ctm and cat:
           the merged delta is linear in the weights once the subspaces are fixed)

Left out, `params` is λ plus every grid parameter the method and rule take (β for ctm,
density for ties/dare_ties, drop for dare/dare_ties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorafold.errors import InvalidRequest

GRID_PARAMS: tuple[str, ...] = ("lambda", "beta", "density", "drop")
TUNE_PARAMS: tuple[str, ...] = (*GRID_PARAMS, "weights")

DEFAULT_BUDGET = 24            # validation passes: candidates evaluated plus gradient steps
DEFAULT_TIME_LIMIT_S = 600.0
DEFAULT_MAX_LENGTH = 256       # tokens per validation example
DEFAULT_BATCH_SIZE = 16
DEFAULT_LEARNING_RATE = 0.05   # Adam on the weights (they are O(1) numbers)

# The rules and methods whose merged delta is linear in the per-input weights (for fixed
# subspaces), so the weights can be learned through it.
LINEAR_RULES: tuple[str, ...] = ("ta",)
WEIGHT_METHODS: tuple[str, ...] = ("ctm", "cat")


@dataclass(frozen=True)
class TuneRequest:
    """How to tune: which parameters, how many validation passes, how long at most.

    `datasets` count 1 (one set for every input) or one per input; they are held by the
    caller (paths, ids or parsed sets) and not part of this value.
    """

    params: tuple[str, ...] | None = None
    budget: int = DEFAULT_BUDGET
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = DEFAULT_BATCH_SIZE
    learning_rate: float = DEFAULT_LEARNING_RATE

    def to_dict(self) -> dict[str, object]:
        return {"params": None if self.params is None else list(self.params),
                "budget": self.budget, "time_limit_s": self.time_limit_s,
                "max_length": self.max_length, "batch_size": self.batch_size,
                "learning_rate": self.learning_rate}


def default_params(method: str, *, uses_density: bool, uses_drop: bool) -> tuple[str, ...]:
    """λ, plus β for ctm and the rule's own knobs."""
    chosen = ["lambda"]
    if method == "ctm":
        chosen.append("beta")
    if uses_density:
        chosen.append("density")
    if uses_drop:
        chosen.append("drop")
    return tuple(chosen)


def resolve_params(tune: TuneRequest, method: str, rule: str, *, uses_density: bool,
                   uses_drop: bool) -> tuple[str, ...]:
    """The parameters to tune, each checked against the method and rule."""
    if tune.params is None:
        return default_params(method, uses_density=uses_density, uses_drop=uses_drop)
    params = tuple(dict.fromkeys(tune.params))
    if not params:
        raise InvalidRequest("tune params is empty; name at least one of "
                             f"{', '.join(TUNE_PARAMS)} or leave it out", code="invalid_tune")
    unknown = [p for p in params if p not in TUNE_PARAMS]
    if unknown:
        raise InvalidRequest(f"unknown tune parameter {unknown[0]!r}; choose from "
                             f"{', '.join(TUNE_PARAMS)}", code="invalid_tune")
    applies = {"beta": (method == "ctm", "method ctm"),
               "density": (uses_density, "rules ties and dare_ties"),
               "drop": (uses_drop, "rules dare and dare_ties"),
               "weights": (method in WEIGHT_METHODS and rule in LINEAR_RULES,
                           "rule ta with method ctm or cat (the merge must be linear in "
                           "the weights)")}
    for name in params:
        if name in applies and not applies[name][0]:
            raise InvalidRequest(f"tune parameter {name} applies to {applies[name][1]}, not "
                                 f"{method}/{rule}", code="invalid_tune")
    return params


def check_tune_request(tune: TuneRequest, *, n_inputs: int, n_datasets: int,
                       max_budget: int | None = None) -> None:
    """Everything about the tuning itself that is checkable without tensors or data."""
    if n_datasets < 1:
        raise InvalidRequest("a tuned merge needs at least one validation data set",
                             code="tune_data_required")
    if n_datasets not in (1, n_inputs):
        raise InvalidRequest(f"{n_datasets} validation sets for {n_inputs} inputs: give one "
                             "set for all inputs or one per input", code="invalid_tune")
    if tune.budget < 1:
        raise InvalidRequest(f"tune budget must be at least 1 evaluation, got {tune.budget}",
                             code="invalid_tune")
    if max_budget is not None and tune.budget > max_budget:
        raise InvalidRequest(f"tune budget {tune.budget} is over this service's bound of "
                             f"{max_budget} evaluations", code="tune_budget_exceeded",
                             limit=max_budget)
    for name, value in (("time_limit_s", tune.time_limit_s),
                        ("learning_rate", tune.learning_rate)):
        if not (math.isfinite(value) and value > 0):
            raise InvalidRequest(f"tune {name} must be a positive number, got {value}",
                                 code="invalid_tune")
    for name, count in (("max_length", tune.max_length), ("batch_size", tune.batch_size)):
        if count < 1:
            raise InvalidRequest(f"tune {name} must be at least 1, got {count}",
                                 code="invalid_tune")


def parse_params(text: str | None) -> tuple[str, ...] | None:
    """`--tune-params lambda,beta`: comma-separated names (checked later, with the rule)."""
    if text is None:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())

