"""/v1/merges: submit a merge job (202 + the job)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.deps import ContextDep, IdempotencyKeyDep, TenantDep
from app.errors import problem_responses
from app.metrics import Metrics
from app.schemas import JobPublic, MergeCreate
from lorafold.service.merges import create_merge

router = APIRouter(prefix="/v1/merges", tags=["merges"])


@router.post("", status_code=202, response_model=JobPublic, summary="Merge adapters",
             responses=problem_responses(401, 404, 409, 413, 422, 429, 503))
def submit_merge(body: MergeCreate, request: Request, response: Response, ctx: ContextDep,
                 tenant: TenantDep, idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    """Checks the request and the inputs (same tenant, same base model unless `force`) before
    queuing; then follow the job at `Location`."""
    record = create_merge(ctx=ctx, tenant=tenant, adapter_ids=[a.id for a in body.adapters],
                          request=body.to_request(), name=body.name,
                          idempotency_key=idempotency_key, webhook_url=body.webhook_url,
                          tune=body.tune.to_spec() if body.tune is not None else None)
    metrics: Metrics = request.app.state.metrics
    metrics.jobs_submitted.labels("merge").inc()
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    return JobPublic.model_validate(record.to_dict())
