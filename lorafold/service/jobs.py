"""Submitting, reading and cancelling jobs, always within one tenant."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from lorafold.errors import StorageError
from lorafold.jobs import JobPage, JobRecord, JobStatus, JobType
from lorafold.jobs.models import new_job_id
from lorafold.service.context import ServiceContext
from lorafold.service.job_inputs import check_inputs_exist, holding_items, job_inputs
from lorafold.service.queues import enqueue
from lorafold.service.quotas import check_storage_quota, check_work_bounds, tenant_stored_bytes
from lorafold.service.webhooks import resolve_webhook

logger = logging.getLogger(__name__)


def submit_job(*, ctx: ServiceContext, tenant: str, job_type: JobType,
               params: Mapping[str, Any], webhook_url: str | None = None) -> JobRecord:
    """Create the job's record, then queue it; a job that cannot be queued is marked
    failed (retryable) rather than left queued forever. The job's webhook (the request's,
    else the tenant's default) is kept in its params for the worker.

    Quotas and bounds (`quotas`) are checked first; then, holding the locks of the job's
    inputs, the inputs are checked to still exist and a slot among the tenant's live jobs
    is taken, so a concurrent delete of an input either sees this job or makes it 404."""
    check_work_bounds(ctx.settings, job_type, params)
    check_storage_quota(ctx.settings, tenant=tenant, used=tenant_stored_bytes(ctx, tenant),
                        adding=0)
    url = resolve_webhook(ctx.settings, tenant, webhook_url)
    if url is not None:
        params = {**params, "webhook_url": url}
    job_id = new_job_id()
    inputs = job_inputs(params)
    with holding_items(ctx, tenant, inputs):
        check_inputs_exist(ctx, tenant, inputs)
        ctx.active_jobs.reserve(tenant=tenant, job_id=job_id,
                                limit=ctx.settings.tenant_max_active_jobs, now=time.time())
        try:
            record = ctx.jobs.create(tenant=tenant, type=job_type, params=params,
                                     job_id=job_id)
        except BaseException:
            ctx.active_jobs.release(tenant=tenant, job_id=job_id)
            raise
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
