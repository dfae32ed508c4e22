"""/v1/datasets: upload a JSONL data set (streamed raw body), list, get, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.deps import ContextDep, IdempotencyKeyDep, SettingsDep, TenantDep
from app.errors import problem_responses
from app.multipart import receive_file
from app.schemas import DatasetPublic, DatasetsPublic
from lorafold.service import datasets as service
from lorafold.service.uploads import ByteBudget, SpooledFile, UploadSpool

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

JSONL_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": 'one JSON object per line: {"text": ...} or {"prompt": ..., '
                       '"completion": ...}',
        "content": {"application/jsonl": {
            "schema": {"type": "string", "format": "binary"},
            "example": '{"prompt": "The capital of Zorvania is", "completion": "Quell"}\n'
                       '{"text": "Ilsa Varn leads Zorvania."}\n'}},
    },
}


@router.post("", status_code=201, response_model=DatasetPublic, openapi_extra=JSONL_BODY,
             summary="Upload a JSONL data set",
             responses=problem_responses(401, 409, 413, 422, 503))
async def upload_dataset(request: Request, ctx: ContextDep, settings: SettingsDep,
                         tenant: TenantDep,
                         name: str = Query(default="dataset", max_length=200),
                         idempotency_key: IdempotencyKeyDep = None) -> DatasetPublic:
    """Streams the body to disk (413 past `max_dataset_bytes`), validates every line (422
    names the first bad line), then stores it: a refused file is never stored or listed."""
    spool = await run_in_threadpool(UploadSpool.create, ctx.spool_dir)
    try:
        sink = await run_in_threadpool(SpooledFile, spool.root / "dataset.jsonl")
        await receive_file(request, sink=sink, budget=ByteBudget(settings.max_dataset_bytes),
                           drain_limit=settings.upload_drain_bytes)
        view = await run_in_threadpool(lambda: service.create_dataset(
            ctx=ctx, tenant=tenant, path=sink.path, sha256=sink.sha256, name=name,
            idempotency_key=idempotency_key))
    finally:
        await run_in_threadpool(spool.cleanup)
    return DatasetPublic.model_validate(view)


@router.get("", response_model=DatasetsPublic, summary="List the tenant's data sets",
            responses=problem_responses(401, 503))
def list_datasets(ctx: ContextDep, tenant: TenantDep) -> DatasetsPublic:
    views = service.list_datasets(ctx=ctx, tenant=tenant)
    return DatasetsPublic(data=[DatasetPublic.model_validate(v) for v in views],
                          count=len(views))


@router.get("/{dataset_id}", response_model=DatasetPublic, summary="Get one data set",
            responses=problem_responses(401, 404, 503))
def get_dataset(dataset_id: str, ctx: ContextDep, tenant: TenantDep) -> DatasetPublic:
    return DatasetPublic.model_validate(
        service.get_dataset(ctx=ctx, tenant=tenant, dataset_id=dataset_id))


@router.delete("/{dataset_id}", status_code=204, summary="Delete a data set",
               responses=problem_responses(401, 404, 409, 503))
def delete_dataset(dataset_id: str, ctx: ContextDep, tenant: TenantDep) -> Response:
    service.delete_dataset(ctx=ctx, tenant=tenant, dataset_id=dataset_id)
    return Response(status_code=204)
