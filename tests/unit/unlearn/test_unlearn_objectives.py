"""Forget losses against their definitions, by hand: the inverted hinge, SimNPO's margin."""

from __future__ import annotations

import math

import pytest
import torch

from lorafold.unlearn.datasets import IGNORE_INDEX, Batch
from lorafold.unlearn.hyperparams import Hyperparams
from lorafold.unlearn.objectives import StepInputs, inverted_hinge, simnpo


def test_inverted_hinge_by_hand() -> None:
    # vocab 3; sequence [x, 1, 2]: position 0 predicts 1, position 1 predicts 2.
    p0 = torch.tensor([0.2, 0.5, 0.3])   # target 1 is the argmax: 1 + 0.5 − 0.3 = 1.2
    p1 = torch.tensor([0.6, 0.3, 0.1])   # target 2 is outranked: 1 + 0.1 − 0.6 = 0.5
    logits = torch.stack([p0.log(), p1.log(), torch.zeros(3)]).unsqueeze(0)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])
    assert float(inverted_hinge(logits, labels)) == pytest.approx((1.2 + 0.5) / 2, rel=1e-6)
    # prompt tokens count for nothing; the mean is per example, then over examples
    prompt_only = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2]])
    assert float(inverted_hinge(logits, prompt_only)) == pytest.approx(0.5, rel=1e-6)
    two = inverted_hinge(torch.cat([logits, logits]), torch.cat([labels, prompt_only]))
    assert float(two) == pytest.approx(((1.2 + 0.5) / 2 + 0.5) / 2, rel=1e-6)


def test_inverted_hinge_is_bounded_and_pushes_the_target_down() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(4, 6, 11) * 5).requires_grad_(True)
    labels = torch.randint(0, 11, (4, 6))
    labels[:, 0] = IGNORE_INDEX
    loss = inverted_hinge(logits, labels)
    assert 0.0 <= float(loss.detach()) <= 2.0
    loss.backward()
    assert logits.grad is not None
    targets = labels[:, 1:]
    grad_at_target = logits.grad[:, :-1].gather(-1, targets.unsqueeze(-1))
    assert bool((grad_at_target >= 0).all())  # descending it lowers every target's logit


class FixedLogits:
    """Stands in for the model: the loss under test only calls model(batch).logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def __call__(self, batch: Batch) -> FixedLogits:
        return self


def test_simnpo_is_linear_below_its_margin_and_fades_past_it() -> None:
    # one example, one answer token whose NLL is set directly: p(target) = exp(−ℓ)
    beta, delta = 2.5, 5.0
    hp = Hyperparams(beta=beta)

    def loss_at(nll: float) -> float:
        p = math.exp(-nll)
        logits = torch.tensor([[[0.0, 0.0], [math.log(p), math.log(1 - p)], [0.0, 0.0]]])
        batch = Batch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long),
                      torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0]]), torch.tensor([0]))
        inputs = StepInputs(forget=batch, retain=None, delta=delta)
        loss, logs = simnpo(FixedLogits(logits), inputs, hp)  # type: ignore[arg-type]
        assert logs["forget_nll"] == pytest.approx(nll, rel=1e-5)
        return float(loss)

    assert loss_at(delta) == pytest.approx((2 / beta) * math.log(2), rel=1e-5)
    # far below δ the loss is ≈ 2·(δ − ℓ): a plain ascent of slope 2
    assert loss_at(0.5) - loss_at(1.0) == pytest.approx(2 * 0.5, rel=1e-3)
    # past δ it fades: a push of exp(−β·4) at 4 nats above
    assert loss_at(delta + 4) < (2 / beta) * math.exp(-beta * 4) * 1.01
