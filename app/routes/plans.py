"""/v1/plans: submit a consolidation plan (202 + the job)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.deps import ContextDep, IdempotencyKeyDep, TenantDep
from app.errors import problem_responses
from app.metrics import Metrics
from app.schemas import JobPublic, PlanCreate
from lorafold.service.plans import create_plan

router = APIRouter(prefix="/v1/plans", tags=["plans"])


@router.post("", status_code=202, response_model=JobPublic,
             summary="Plan which adapters to merge together",
             responses=problem_responses(401, 404, 409, 413, 422, 429, 503))
def submit_plan(body: PlanCreate, request: Request, response: Response, ctx: ContextDep,
                tenant: TenantDep, idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    """Checks the options and the inputs before queuing; the job's result is the plan
    (nothing is merged: submit each group to /v1/merges)."""
    record = create_plan(ctx=ctx, tenant=tenant, adapter_ids=body.adapters,
                         options=body.options(), idempotency_key=idempotency_key,
                         webhook_url=body.webhook_url)
    metrics: Metrics = request.app.state.metrics
    metrics.jobs_submitted.labels("plan").inc()
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    return JobPublic.model_validate(record.to_dict())
