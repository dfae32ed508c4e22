"""A superseded attempt, run for real through `run_attempt`: it stops at its next
checkpoint, records nothing, leaves no work dir, and the live attempt finishes the job."""

from __future__ import annotations

from typing import Any

from lorafold.jobs import JobStatus, JobType
from lorafold.service.attempts import JobWork, current_attempt, run_attempt
from lorafold.service.context import ServiceContext
from lorafold.service.joblog import JobLogger
from lorafold.service.workdirs import work_root
from workers.tasks import fail_job

STAGES = {"work": (0.0, 1.0)}


def test_a_superseded_attempt_stops_and_the_live_one_finishes(ctx: ServiceContext) -> None:
    job = ctx.jobs.create(tenant="t", type=JobType.MERGE, params={})
    seen: dict[str, Any] = {}

    def stale_body(work: JobWork, log: JobLogger) -> dict[str, Any]:
        work.progress("work", 0.25)
        seen["attempt"] = current_attempt.get()
        ctx.jobs.mark_running(job.id)  # the job was re-queued and another worker started it
        work.progress("work", 0.5)     # refused: a newer attempt runs the job
        raise AssertionError("a superseded attempt went on")

    assert run_attempt(ctx, job.id, stale_body, device="cpu", stages=STAGES) is None
    assert seen["attempt"] == 1
    record = ctx.jobs.get(job.id)
    assert (record.status, record.attempts) == (JobStatus.RUNNING, 2)
    assert record.progress.fraction < 0.5
    fail_job(ctx, job.id, {"code": "job_timeout", "message": "late"}, attempt=1)  # refused
    assert ctx.jobs.get(job.id).status is JobStatus.RUNNING
    assert list(work_root(ctx.spool_dir).iterdir()) == []

    done = ctx.jobs.mark_succeeded(job.id, {"adapter_id": "ad_live", "report": {}}, attempt=2)
    assert done.status is JobStatus.SUCCEEDED
