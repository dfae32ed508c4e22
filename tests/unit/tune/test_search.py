"""The coarse-to-fine coordinate search on functions whose minimum is known."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from lorafold.tune.search import Dimension, coordinate_search

LAMBDA = Dimension("lambda", (0.25, 0.5, 1.0, 2.0), 0.0, 4.0)
BETA = Dimension("beta", (0.0, 0.5, 1.0), 0.0, 1.0)


def bowl(point: Mapping[str, float]) -> float:
    """Minimum 0 at λ = 0.7, β = 0.3: neither on the coarse grid."""
    return (point["lambda"] - 0.7) ** 2 + 2 * (point["beta"] - 0.3) ** 2


def test_the_best_is_no_worse_than_any_grid_point_and_refinement_gets_closer() -> None:
    coarse = coordinate_search([LAMBDA, BETA], bowl, start={"lambda": 1.0, "beta": 0.0},
                               refine=False)
    fine = coordinate_search([LAMBDA, BETA], bowl, start={"lambda": 1.0, "beta": 0.0})
    for result in (coarse, fine):
        assert result.best_loss == min(e.loss for e in result.history)
        assert result.history[0].stage == "start" and result.history[0].point["lambda"] == 1.0
    grid_points = [e for e in fine.history if e.stage.startswith("grid")]
    assert fine.best_loss <= min(e.loss for e in grid_points)
    assert fine.best_loss < coarse.best_loss
    assert fine.best["lambda"] == pytest.approx(0.7, abs=0.05)
    assert fine.best["beta"] == pytest.approx(0.3, abs=0.05)


def test_points_are_scored_once_and_the_budget_counts_distinct_candidates() -> None:
    calls: list[dict[str, float]] = []

    def counted(point: Mapping[str, float]) -> float:
        calls.append(dict(point))
        return bowl(point)

    result = coordinate_search([LAMBDA, BETA], counted, start={"lambda": 1.0, "beta": 0.0},
                               budget=5)
    assert result.evaluations == len(calls) == 5
    assert len({tuple(sorted(c.items())) for c in calls}) == 5
    assert result.stopped == "budget"


def test_same_scores_give_the_same_path() -> None:
    runs = [coordinate_search([LAMBDA, BETA], bowl, start={"lambda": 1.0, "beta": 0.0})
            for _ in range(2)]
    assert [(e.point, e.loss, e.stage) for e in runs[0].history] == \
        [(e.point, e.loss, e.stage) for e in runs[1].history]


def test_a_spent_clock_still_scores_the_start_and_stops() -> None:
    result = coordinate_search([LAMBDA], lambda p: p["lambda"], start={"lambda": 1.0},
                               time_limit_s=0.0)
    assert result.evaluations == 1 and result.stopped == "time_limit"
    assert result.best == {"lambda": 1.0}


def test_steps_may_revisit_a_dimension_and_ties_keep_the_earlier_value() -> None:
    flat = coordinate_search([LAMBDA], lambda p: 1.0, start={"lambda": 0.25},
                             steps=["lambda", "lambda"], refine=False)
    assert flat.best == {"lambda": 0.25}
    assert [e.point["lambda"] for e in flat.history] == [0.25, 0.5, 1.0, 2.0]


def test_refinement_stays_in_the_box() -> None:
    edge = coordinate_search([BETA], lambda p: -p["beta"], start={"beta": 1.0})
    assert all(0.0 <= e.point["beta"] <= 1.0 for e in edge.history)
    assert edge.best == {"beta": 1.0}
