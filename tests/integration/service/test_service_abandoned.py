"""RQ 3.0's handling of abandoned jobs, as our worker configures it, step by step.

A worker marks a job started and renews its StartedJobRegistry entry while it runs; the
entry expires `job_monitoring_interval + abandoned_after_s` after the last renewal (RQ's
own default is interval + 60 s). When a worker dies, the next registry cleanup finds the
expired entry, calls the job's failure callback (ours records the loss) and re-queues the
job while its `Retry` has retries left; with none left our callback fails the record.
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any

import pytest
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from lorafold.jobs import JobType
from lorafold.service.context import ServiceContext
from lorafold.service.queues import enqueue
from workers.worker import LorafoldWorker, build_worker


def start_like_a_worker(worker: LorafoldWorker, queue: Queue) -> tuple[Job, Any]:
    """What a worker does before its horse runs the job, up to the point where it dies."""
    result = Queue.dequeue_any([queue], None, connection=queue.connection,
                               serializer=JSONSerializer)
    assert result is not None
    job, _ = result
    execution = worker.prepare_execution(job)
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    return job, execution


@pytest.fixture
def worker(ctx: ServiceContext) -> LorafoldWorker:
    worker = build_worker(ctx, f"int-{time.monotonic_ns()}")
    worker.register_birth()
    return worker


def test_abandoned_job_is_retried_then_failed(ctx: ServiceContext,
                                              worker: LorafoldWorker) -> None:
    record = ctx.jobs.create(tenant="tenant-a", type=JobType.MERGE, params={})
    enqueue(redis=ctx.redis, settings=ctx.settings, job_type=JobType.MERGE, job_id=record.id)
    queue = worker.queues[0]
    raw = ctx.redis.hget(f"rq:job:{record.id}", "data")
    assert raw is not None
    assert json.loads(zlib.decompress(raw))[2] == [record.id]  # JSON (zlib'd), never pickle

    registry = StartedJobRegistry(queue.name, connection=ctx.redis, serializer=JSONSerializer)
    job, execution = start_like_a_worker(worker, queue)
    ctx.jobs.mark_running(record.id)
    deadline = ctx.redis.zscore(registry.key, execution.composite_key)
    expected = (ctx.settings.job_monitoring_interval_s + ctx.settings.abandoned_after_s)
    assert deadline is not None and abs(deadline - (time.time() + expected)) < 2

    registry.cleanup(timestamp=time.time() - 1)  # not expired yet: left alone
    assert job.get_status() == JobStatus.STARTED

    registry.cleanup(timestamp=deadline + 1)  # the worker went silent
    job.refresh()
    assert job.get_status() == JobStatus.QUEUED and record.id in queue.job_ids
    assert job.retries_left == ctx.settings.job_retries - 1 == 0
    messages = [e.get("message", "") for e in ctx.jobs.events(record.id, tenant=None)]
    assert any("abandoned" in m and "retrying" in m for m in messages), messages
    assert ctx.jobs.get(record.id).status.value == "running"

    job, execution = start_like_a_worker(worker, queue)  # the retry is abandoned too
    ctx.jobs.mark_running(record.id)
    registry.cleanup(timestamp=time.time() + expected + 5)
    final = ctx.jobs.get(record.id)
    assert final.status.value == "failed" and final.attempts == 2
    assert final.error is not None
    assert (final.error["code"], final.error["retryable"]) == ("worker_lost", True)
    assert job.get_status() == JobStatus.FAILED
