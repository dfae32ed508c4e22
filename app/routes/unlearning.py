"""/v1/unlearning: submit an unlearning job (202 + the job)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.deps import ContextDep, IdempotencyKeyDep, TenantDep
from app.errors import problem_responses
from app.metrics import Metrics
from app.schemas import JobPublic, UnlearningCreate
from lorafold.service.unlearning import create_unlearning

router = APIRouter(prefix="/v1/unlearning", tags=["unlearning"])


@router.post("", status_code=202, response_model=JobPublic, summary="Unlearn",
             responses=problem_responses(401, 404, 409, 413, 422, 429, 503))
def submit_unlearning(body: UnlearningCreate, request: Request, response: Response,
                      ctx: ContextDep, tenant: TenantDep,
                      idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    """Checks the adapter, its lineage (remove), the base model and the fit of the adapter
    to it, and the data sets before queuing; then follow the job at `Location`. The job's
    result names the new adapter and carries the merge report or the unlearning metrics."""
    record = create_unlearning(ctx=ctx, tenant=tenant, spec=body.to_spec(), name=body.name,
                               idempotency_key=idempotency_key, webhook_url=body.webhook_url)
    metrics: Metrics = request.app.state.metrics
    metrics.jobs_submitted.labels("unlearn").inc()
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    return JobPublic.model_validate(record.to_dict())
