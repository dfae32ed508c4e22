"""Learned per-input weights (after MEHL-Soup's learned mixing coefficients, memory-lean).

For the linear rule ta and fixed subspaces a module's merged delta is
B_out (λ Σ_t w_t C_t) A_out (lorafold.tune.candidates.LinearView), so the validation loss
is differentiable in w through a forward of x ↦ B_out M(w) A_out x with M(w) an r×r
matrix: no m×n delta is formed, and memory is the base model, one rank-r adapter's factors
(B_out, A_out), the T r×r coordinates and the activations of one batch.

Adam on w from the starting weights, one step per pass over the validation data; the
weights at the lowest loss seen are kept. Stops at the step budget, the deadline, or when
the loss has improved by less than `min_improvement` (relative) over `patience` steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lorafold.adapters.reader import ModuleSpec
from lorafold.tune.candidates import LinearView
from lorafold.tune.evaluation import ValidationSets
from lorafold.tune.patch import Chain, Delta, chain_delta, patched

PATIENCE = 5
MIN_IMPROVEMENT = 1e-4
Checkpoint = Callable[[], None]


@dataclass
class LearnedWeights:
    weights: list[float]
    loss: float                       # validation loss at `weights`
    start_loss: float                 # at the starting weights
    curve: list[float] = field(default_factory=list)   # loss at each step's weights
    steps: int = 0
    stopped: str = "converged"        # converged | budget | time_limit


def _deltas(views: Sequence[LinearView], w: torch.Tensor, scale: float,
            ) -> dict[str, tuple[ModuleSpec, Delta]]:
    deltas: dict[str, tuple[ModuleSpec, Delta]] = {}
    for view in views:
        index = torch.tensor(view.inputs, device=w.device)

        def chain(view: LinearView = view, index: torch.Tensor = index) -> Chain:
            middle = torch.einsum("t,tij->ij", w[index] * scale, view.coordinates)
            return view.a_out, middle, view.b_out
        deltas[view.spec.name] = (view.spec, chain_delta(view.spec, chain))
    return deltas


def learn_weights(model: nn.Module, sets: ValidationSets, views: Sequence[LinearView], *,
                  start: Sequence[float], scale: float, steps: int, learning_rate: float,
                  deadline: float | None = None, checkpoint: Checkpoint | None = None,
                  on_step: Callable[[int, float], None] | None = None) -> LearnedWeights:
    """Gradient descent on the validation loss over one weight per input."""
    device = views[0].coordinates.device if views else torch.device("cpu")
    w = torch.tensor(list(start), dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=learning_rate)
    deltas = _deltas(views, w, scale)
    curve: list[float] = []
    best_w, best_loss = [float(x) for x in start], float("inf")
    stopped = "budget"
    with patched(model, deltas):
        for step in range(steps):
            if checkpoint is not None:
                checkpoint()
            if deadline is not None and time.monotonic() >= deadline:
                stopped = "time_limit"
                break
            optimizer.zero_grad()
            loss = sets.backward(model)
            curve.append(loss)
            if loss < best_loss:
                best_w, best_loss = w.detach().tolist(), loss
            if on_step is not None:
                on_step(step + 1, loss)
            if len(curve) > PATIENCE and \
                    curve[-PATIENCE - 1] - min(curve[-PATIENCE:]) <= MIN_IMPROVEMENT * abs(
                        curve[-PATIENCE - 1]):
                stopped = "converged"
                break
            optimizer.step()
    return LearnedWeights(weights=best_w, loss=best_loss,
                          start_loss=curve[0] if curve else float("inf"), curve=curve,
                          steps=len(curve), stopped=stopped)
