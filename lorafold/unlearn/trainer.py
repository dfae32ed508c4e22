"""The optimisation loop shared by every method: AdamW, clipping, seeding, stopping.

Gold-free stopping: a holdout set of examples the model never trained on tells us what
"never seen" looks like, so training stops as soon as the forget set's NLL reaches the
holdout set's NLL (checked every `eval_every` steps). The check measures the model that
will be written: the trained one, or (`output_view`) a consolidation of it. Without a
holdout set the loop runs `max_steps`. Cancellation is cooperative: `checkpoint()` is
called before every step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lorafold.errors import NumericalError
from lorafold.unlearn.datasets import Batch, Encoded, make_batches
from lorafold.unlearn.hyperparams import Hyperparams
from lorafold.unlearn.metrics import autocast_for, measure, token_stats
from lorafold.unlearn.model import UnlearnModel
from lorafold.unlearn.objectives import MethodSpec, StepInputs, resolve_layers

logger = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 16


@dataclass
class TrainOutcome:
    steps: int
    stopped_early: bool   # the stopping rule fired before max_steps
    target_reached: bool  # forget NLL >= holdout NLL at the last check
    history: list[dict[str, float]] = field(default_factory=list)
    delta: float | None = None  # simnpo: the target NLL it used


def _cycle(items: Sequence[Encoded], *, batch_size: int, pad_id: int,
           generator: torch.Generator) -> Iterator[Batch]:
    """Endless reshuffled epochs (reproducible from the generator's seed)."""
    while True:
        yield from make_batches(items, batch_size=batch_size, pad_id=pad_id, generator=generator)


@torch.no_grad()
def reference_logprobs(model: UnlearnModel, items: Sequence[Encoded], *,
                       pad_id: int) -> torch.Tensor:
    """log p(y|x) of each example under the model as it is now (npo's reference)."""
    reference = torch.zeros(len(items), device=model.device)
    for batch in make_batches(items, batch_size=EVAL_BATCH_SIZE, pad_id=pad_id):
        batch = batch.to(model.device)
        with autocast_for(model.device):
            logits = model(batch).logits
        reference[batch.index] = token_stats(logits, batch.labels).logprob_sum
    return reference


OutputView = Callable[[], contextlib.AbstractContextManager[object]]


class _StopRule:
    """Forget NLL vs holdout NLL, both measured on the model that will be written."""

    def __init__(self, model: UnlearnModel, forget: Sequence[Encoded],
                 holdout: Sequence[Encoded], *, pad_id: int,
                 output_view: OutputView | None) -> None:
        self.model = model
        self.forget = make_batches(forget, batch_size=EVAL_BATCH_SIZE, pad_id=pad_id)
        self.holdout = make_batches(holdout, batch_size=EVAL_BATCH_SIZE, pad_id=pad_id)
        self.output_view = output_view or contextlib.nullcontext

    def check(self, step: int) -> tuple[bool, dict[str, float]]:
        forward = lambda _m, b: self.model(b).logits  # noqa: E731 - through the adapter views
        with self.output_view():
            forget = measure(self.model.peft, self.forget, forward).mean_nll
            holdout = measure(self.model.peft, self.holdout, forward).mean_nll
        logger.debug("step %d: forget NLL %.4f, holdout NLL %.4f", step, forget, holdout)
        return forget >= holdout, {"step": float(step), "forget_nll": forget,
                                   "holdout_nll": holdout}


def _delta(hp: Hyperparams, history: Sequence[dict[str, float]]) -> float:
    """simnpo's δ: as given, else the original's holdout NLL (step 0), else 0 (the paper's γ=0)."""
    if hp.delta is not None:
        return hp.delta
    return history[0]["holdout_nll"] if history else 0.0


def train(model: UnlearnModel, spec: MethodSpec, hp: Hyperparams, *,
          forget: Sequence[Encoded], retain: Sequence[Encoded] | None,
          holdout: Sequence[Encoded] | None, pad_id: int,
          on_step: Callable[[int], None] | None = None,
          checkpoint: Callable[[], None] | None = None,
          output_view: OutputView | None = None) -> TrainOutcome:
    """Run `spec`'s loss for up to hp.max_steps; returns how far it went and why it stopped.

    `output_view()` (a context manager) switches the model to what will be written, for
    the stopping checks, when that is not the trained model itself.
    """
    torch.manual_seed(hp.seed)
    generator = torch.Generator().manual_seed(hp.seed)
    device = model.device
    reference = reference_logprobs(model, forget, pad_id=pad_id) if spec.needs_reference \
        else None
    layers = resolve_layers(hp.layers, model.num_layers()) \
        if spec.name == "feature_alignment" else []
    forget_stream = _cycle(forget, batch_size=hp.batch_size, pad_id=pad_id, generator=generator)
    retain_stream = _cycle(retain, batch_size=hp.batch_size, pad_id=pad_id,
                           generator=generator) if retain and spec.uses_retain else None
    stop = _StopRule(model, forget, holdout, pad_id=pad_id, output_view=output_view) \
        if holdout else None
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    outcome = TrainOutcome(steps=0, stopped_early=False, target_reached=False)
    if stop is None:
        logger.warning("%s: no holdout set; running all %d steps without a stopping rule",
                       spec.name, hp.max_steps)
    else:
        reached, record = stop.check(0)
        outcome.history.append(record)
        if reached:
            logger.info("%s: forget NLL already at holdout level; nothing to do", spec.name)
            outcome.stopped_early = outcome.target_reached = True
            return outcome
    if spec.needs_delta:
        outcome.delta = _delta(hp, outcome.history)
    for step in range(1, hp.max_steps + 1):
        if checkpoint is not None:
            checkpoint()
        inputs = StepInputs(
            forget=next(forget_stream).to(device),
            retain=next(retain_stream).to(device) if retain_stream is not None else None,
            reference=reference, layers=layers, delta=outcome.delta or 0.0)
        with autocast_for(device):
            loss, logs = spec.loss(model, inputs, hp)
        if not torch.isfinite(loss):
            raise NumericalError(f"{spec.name}: loss became {float(loss.detach())} "
                                 f"at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
        optimizer.step()
        outcome.steps = step
        logger.debug("%s step %d: loss %.4f %s", spec.name, step, float(loss.detach()), logs)
        if on_step is not None:
            on_step(step)
        if stop is not None and (step % hp.eval_every == 0 or step == hp.max_steps):
            reached, record = stop.check(step)
            outcome.history.append(record)
            outcome.target_reached = reached
            if reached:
                outcome.stopped_early = step < hp.max_steps
                logger.info("%s: forget NLL reached holdout NLL at step %d", spec.name, step)
                break
    optimizer.zero_grad(set_to_none=True)
    return outcome
