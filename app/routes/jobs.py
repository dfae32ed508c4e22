"""/v1/jobs: list, get, events, cancel — within the caller's tenant.

Every handler here talks to Redis through the synchronous redis-py client, so each is a
plain `def`: FastAPI runs it in its thread pool and the event loop stays free. A stalled
Redis then holds one worker thread for at most the client's socket timeout (and answers
503 `queue_unavailable`), never the loop: `/healthz` and other requests keep answering.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.deps import ContextDep, TenantDep
from app.errors import problem_responses
from app.schemas import JobEventPublic, JobEventsPublic, JobPublic, JobsPublic
from lorafold.jobs import JobStatus, JobType
from lorafold.service import jobs as service

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("", response_model=JobsPublic, summary="List jobs, newest first",
            responses=problem_responses(401, 422))
def list_jobs(ctx: ContextDep, tenant: TenantDep,
              status: Annotated[JobStatus | None, Query()] = None,
              type: Annotated[JobType | None, Query()] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50,
              cursor: Annotated[str | None, Query(max_length=128)] = None) -> JobsPublic:
    page = service.list_jobs(ctx=ctx, tenant=tenant, status=status, job_type=type,
                             limit=limit, cursor=cursor)
    data = [JobPublic.model_validate(r.to_dict()) for r in page.items]
    return JobsPublic(data=data, count=len(data), next_cursor=page.next_cursor)


@router.get("/{job_id}", response_model=JobPublic, summary="Get a job",
            responses=problem_responses(401, 404))
def get_job(job_id: str, ctx: ContextDep, tenant: TenantDep) -> Response:
    # The most polled endpoint: validated once and serialised by pydantic directly.
    job = JobPublic.model_validate(service.get_job(ctx=ctx, tenant=tenant,
                                                   job_id=job_id).to_dict())
    return Response(job.model_dump_json(), media_type="application/json")


@router.get("/{job_id}/events", response_model=JobEventsPublic,
            summary="A job's timeline (status changes, progress stages, log lines)",
            responses=problem_responses(401, 404, 422))
def job_events(job_id: str, ctx: ContextDep, tenant: TenantDep,
              since: Annotated[int, Query(ge=0)] = 0) -> JobEventsPublic:
    events = service.job_events(ctx=ctx, tenant=tenant, job_id=job_id, since=since)
    return JobEventsPublic(data=[JobEventPublic.model_validate(e) for e in events],
                           count=len(events), last_seq=events[-1]["seq"] if events else since)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic,
             summary="Cancel a job",
             responses=problem_responses(401, 404, 409))
def cancel_job(job_id: str, ctx: ContextDep, tenant: TenantDep) -> JobPublic:
    """A queued job is cancelled at once; a running one stops at its next checkpoint
    (between modules). A finished job answers 409 job_finished."""
    return JobPublic.model_validate(
        service.cancel_job(ctx=ctx, tenant=tenant, job_id=job_id).to_dict())
