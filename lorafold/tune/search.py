"""Coarse-to-fine coordinate search over named parameters, bounded by a budget and a clock.

Minimises `score(point)` (a validation loss) over a box of named parameters:

0. the start point (the untuned values) is scored first;
1. the `steps` (by default each dimension once, in order): each step scores the
   dimension's coarse grid with every other parameter at the best point so far and moves
   there (the earlier grid value wins ties);
2. refinement rounds: each dimension again, on the two points half a grid spacing either
   side of the current best, the spacing halving every round, until a round lowers the
   best loss by less than `min_improvement` (relative): early stopping.

Every scored point is remembered, so a point is never scored twice and the budget counts
distinct candidates. The start point is always scored, whatever the clock says; the search
stops at the budget or the time limit and returns the best point scored, which is therefore
no worse than any grid point it visited. Nothing here is random: the same scores give the
same path (a merge's own randomness is its seed's).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

Point = dict[str, float]
Score = Callable[[Mapping[str, float]], float]

MIN_IMPROVEMENT = 1e-3
MAX_ROUNDS = 6


@dataclass(frozen=True)
class Dimension:
    """One parameter: its coarse grid and the box refinement stays in."""

    name: str
    grid: tuple[float, ...]
    low: float
    high: float

    def spacing(self, value: float) -> float:
        """The coarse grid's spacing next to `value` (the smaller neighbouring gap)."""
        gaps = [abs(b - a) for a, b in zip(self.grid, self.grid[1:], strict=False)]
        if not gaps:
            return (self.high - self.low) / 4
        nearest = min(range(len(self.grid)), key=lambda i: abs(self.grid[i] - value))
        around = [gaps[i] for i in (nearest - 1, nearest) if 0 <= i < len(gaps)]
        return min(around)


@dataclass(frozen=True)
class Evaluation:
    """One scored candidate, in the order scored."""

    index: int
    point: Point
    loss: float
    stage: str            # "grid:<name>" or "refine:<name>"
    elapsed_s: float


@dataclass
class SearchResult:
    best: Point                  # the best point scored (the earliest on ties)
    best_loss: float
    history: list[Evaluation] = field(default_factory=list)
    stopped: str = "converged"   # converged | budget | time_limit | exhausted
    current: Point = field(default_factory=dict)   # where the coordinate path ended

    @property
    def evaluations(self) -> int:
        return len(self.history)


class BudgetSpent(Exception):
    """Raised inside the search when the budget or the clock is used up."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _key(point: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((k, round(v, 12)) for k, v in point.items()))


class _Scorer:
    """Scores points once each, within the budget and the deadline."""

    def __init__(self, score: Score, budget: int, time_limit_s: float | None,
                 on_evaluation: Callable[[Evaluation], None] | None) -> None:
        self.score = score
        self.budget = budget
        self.deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        self.started = time.perf_counter()
        self.seen: dict[tuple[tuple[str, float], ...], float] = {}
        self.history: list[Evaluation] = []
        self.on_evaluation = on_evaluation

    def __call__(self, point: Point, stage: str) -> float:
        key = _key(point)
        if key in self.seen:
            return self.seen[key]
        if len(self.history) >= self.budget:
            raise BudgetSpent("budget")
        if self.history and self.deadline is not None and time.monotonic() >= self.deadline:
            raise BudgetSpent("time_limit")
        loss = float(self.score(point))
        if math.isnan(loss):
            loss = math.inf
        self.seen[key] = loss
        entry = Evaluation(len(self.history), dict(point), loss, stage,
                           time.perf_counter() - self.started)
        self.history.append(entry)
        if self.on_evaluation is not None:
            self.on_evaluation(entry)
        return loss


def _best_on(scorer: _Scorer, current: Point, name: str, values: Sequence[float],
             stage: str) -> Point:
    """`current` with `name` moved to the best of `values` (earlier wins ties)."""
    best, best_loss = current, math.inf
    for value in values:
        candidate = {**current, name: value}
        loss = scorer(candidate, stage)
        if loss < best_loss:
            best, best_loss = candidate, loss
    return best


def coordinate_search(dimensions: Sequence[Dimension], score: Score, *,
                      start: Mapping[str, float], steps: Sequence[str] | None = None,
                      budget: int = 10_000, time_limit_s: float | None = None,
                      refine: bool = True, min_improvement: float = MIN_IMPROVEMENT,
                      max_rounds: int = MAX_ROUNDS,
                      on_evaluation: Callable[[Evaluation], None] | None = None,
                      ) -> SearchResult:
    """Minimise `score` from `start` (see the module docstring).

    `start` holds every parameter `score` needs, tuned or not; `steps` names the coarse
    coordinate steps (a dimension may appear more than once: the bench's λ, knobs, λ).
    """
    by_name = {d.name: d for d in dimensions}
    scorer = _Scorer(score, budget, time_limit_s, on_evaluation)
    current: Point = dict(start)
    path = [current]     # the point each step moved to; a spent budget leaves it there
    stopped = "converged"
    try:
        scorer(current, "start")   # the untuned point: the baseline every result is against
        for name in (steps if steps is not None else [d.name for d in dimensions]):
            current = _best_on(scorer, current, name, by_name[name].grid, f"grid:{name}")
            path.append(current)
        if refine:
            stopped = _refine(scorer, dimensions, path, min_improvement, max_rounds)
    except BudgetSpent as spent:
        stopped = spent.reason
    if not scorer.history:  # nothing could be scored (a budget of zero)
        return SearchResult(best=dict(start), best_loss=math.inf, stopped=stopped,
                            current=path[-1])
    best = min(scorer.history, key=lambda e: (e.loss, e.index))
    return SearchResult(best=dict(best.point), best_loss=best.loss, history=scorer.history,
                        stopped=stopped, current=dict(path[-1]))


def _refine(scorer: _Scorer, dimensions: Sequence[Dimension], path: list[Point],
            min_improvement: float, max_rounds: int) -> str:
    current = path[-1]
    spacing = {d.name: d.spacing(current[d.name]) / 2 for d in dimensions}
    best_loss = scorer(current, "refine")
    for _ in range(max_rounds):
        before = best_loss
        for d in dimensions:
            value, step = current[d.name], spacing[d.name]
            values = [v for v in (value - step, value + step) if d.low <= v <= d.high]
            current = _best_on(scorer, current, d.name, [value, *values], f"refine:{d.name}")
            path.append(current)
            spacing[d.name] = step / 2
        best_loss = scorer(current, "refine")
        if not before - best_loss > min_improvement * abs(before):
            return "converged"
    return "exhausted"
