"""LORAFOLD_WORKER_JOB_TYPES: which queues a worker listens on, in priority order (the GPU
and CPU worker kinds of deploy/k8s), on the suite's real Redis."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorafold.service.context import ServiceContext
from lorafold.settings import Settings
from workers.worker import build_worker


def queues_of(settings: Settings) -> list[str]:
    ctx = ServiceContext(settings)
    try:
        return [q.name for q in build_worker(ctx, "t").queues]
    finally:
        ctx.close()


def test_default_is_every_type_and_the_setting_orders_them(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    assert queues_of(settings) == ["lorafold-merge", "lorafold-unlearn", "lorafold-plan"]
    monkeypatch.setenv("LORAFOLD_WORKER_JOB_TYPES", '["plan", "merge"]')  # as deploy/k8s sets it
    assert queues_of(Settings(redis_url=settings.redis_url)) == ["lorafold-plan",
                                                                 "lorafold-merge"]


@pytest.mark.parametrize("value", [[], ["merge", "train"]])
def test_unknown_or_no_job_types_are_refused(value: list[str]) -> None:
    with pytest.raises(ValidationError, match="worker_job_types"):
        Settings(worker_job_types=value)
