"""Reading and cancelling jobs, always within one tenant."""

from __future__ import annotations

from typing import Any

from lorafold.jobs import JobPage, JobRecord, JobStatus, JobType
from lorafold.service.context import ServiceContext


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
