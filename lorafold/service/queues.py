"""RQ queues, one per job type, and how a job is put on them.

The RQ job id is our job id, its only argument is that id (JSON serializer, never
pickle), and the function is named by its import path so the API never imports the
worker code. Each type has its own timeout (RQ's default of 180 s would kill real jobs)
and a `Retry` that RQ uses when a job is abandoned: its work horse was killed, or its
worker stopped heartbeating (see `workers/worker.py`). Failures inside a job do not
reach RQ: the job records them itself and returns, so RQ only ever retries lost work.
"""

from __future__ import annotations

from collections.abc import Mapping

from redis import Redis
from rq import Callback, Queue, Retry
from rq.serializers import JSONSerializer

from lorafold.jobs import JobType
from lorafold.settings import Settings

# The RQ entry point of each job type (import paths, resolved in the worker).
TASKS: Mapping[JobType, str] = {
    JobType.MERGE: "workers.tasks.run_merge",
    JobType.UNLEARN: "workers.tasks.run_unlearn",
    JobType.PLAN: "workers.tasks.run_plan",
}
FAILURE_CALLBACK = "workers.tasks.on_job_failure"
RESULT_TTL_S = 3600           # RQ's own copy; our job records are the source of truth
FAILURE_TTL_S = 7 * 24 * 3600


def queue_name(settings: Settings, job_type: JobType) -> str:
    return f"{settings.queue_prefix}-{job_type.value}"


def job_types() -> list[JobType]:
    """The job types that have a task (and so a queue workers listen on)."""
    return list(TASKS)


def worker_job_types(settings: Settings) -> list[JobType]:
    """The job types a worker listens for, in priority order (RQ takes a job from the
    first non-empty queue): `worker_job_types` when set, else every type."""
    if settings.worker_job_types is None:
        return job_types()
    return [JobType(name) for name in dict.fromkeys(settings.worker_job_types)]


def make_queue(redis: Redis, settings: Settings, job_type: JobType) -> Queue:
    return Queue(queue_name(settings, job_type), connection=redis, serializer=JSONSerializer)


def enqueue(*, redis: Redis, settings: Settings, job_type: JobType, job_id: str) -> None:
    """Put job `job_id` on its type's queue with the type's timeout and abandoned-job retry."""
    queue = make_queue(redis, settings, job_type)
    queue.enqueue(
        TASKS[job_type], job_id,
        job_id=job_id,
        job_timeout=settings.job_timeout_s(job_type.value),
        retry=Retry(max=settings.job_retries),
        on_failure=Callback(FAILURE_CALLBACK),
        result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S,
        description=f"{job_type.value} {job_id}",
    )
