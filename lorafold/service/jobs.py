"""Submitting, reading and cancelling jobs, always within one tenant."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from lorafold.errors import StorageError
from lorafold.jobs import JobPage, JobRecord, JobStatus, JobType
from lorafold.service.context import ServiceContext
from lorafold.service.queues import enqueue
from lorafold.service.webhooks import resolve_webhook

logger = logging.getLogger(__name__)


def submit_job(*, ctx: ServiceContext, tenant: str, job_type: JobType,
               params: Mapping[str, Any], webhook_url: str | None = None) -> JobRecord:
    """Create the job's record, then queue it; a job that cannot be queued is marked
    failed (retryable) rather than left queued forever. The job's webhook (the request's,
    else the tenant's default) is kept in its params for the worker."""
    url = resolve_webhook(ctx.settings, tenant, webhook_url)
    if url is not None:
        params = {**params, "webhook_url": url}
    record = ctx.jobs.create(tenant=tenant, type=job_type, params=params)
    try:
        enqueue(redis=ctx.redis, settings=ctx.settings, job_type=job_type, job_id=record.id)
    except RedisError as e:
        error = StorageError(f"the job could not be queued: {e}", code="enqueue_failed")
        ctx.jobs.mark_failed(record.id, error.to_dict())
        raise error from e
    logger.info("job %s: %s queued for tenant %s", record.id, job_type.value, tenant)
    return record


def list_jobs(*, ctx: ServiceContext, tenant: str, status: JobStatus | None = None,
              job_type: JobType | None = None, limit: int = 50,
              cursor: str | None = None) -> JobPage:
    return ctx.jobs.list(tenant=tenant, status=status, type=job_type, limit=limit,
                         cursor=cursor)


def get_job(*, ctx: ServiceContext, tenant: str, job_id: str) -> JobRecord:
    return ctx.jobs.get(job_id, tenant=tenant)


def job_events(*, ctx: ServiceContext, tenant: str, job_id: str,
               since: int = 0) -> list[dict[str, Any]]:
    return ctx.jobs.events(job_id, tenant=tenant, since=since)


def cancel_job(*, ctx: ServiceContext, tenant: str, job_id: str) -> JobRecord:
    """Queued: cancelled now. Running: flagged; the job stops at its next checkpoint."""
    return ctx.jobs.request_cancel(job_id, tenant=tenant)
