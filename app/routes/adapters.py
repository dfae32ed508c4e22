"""/v1/adapters: upload (streamed multipart) or import (JSON), list, get, delete, download."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.deps import ContextDep, IdempotencyKeyDep, SettingsDep, TenantDep
from app.errors import problem_responses, status_for
from app.metrics import Metrics
from app.multipart import receive_small_body, receive_upload
from app.schemas import AdapterImport, AdapterPublic, AdaptersPublic, PreflightPublic
from lorafold.errors import LorafoldError
from lorafold.service import adapters as service
from lorafold.service.context import ServiceContext
from lorafold.service.downloads import DOWNLOAD_FORMATS, MEDIA_TYPES, open_archive_download
from lorafold.service.imports import import_adapter
from lorafold.service.uploads import ByteBudget, UploadSpool, create_adapter

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                              "description": "adapter_config.json and "
                                             "adapter_model.safetensors (file names matter)"},
                    "archive": {"type": "string", "format": "binary",
                                "description": "instead of files: one .zip, .tar.gz or .tar "
                                               "of the adapter directory"},
                    "name": {"type": "string", "maxLength": 200},
                    "metadata": {"type": "string", "description": "a JSON object"},
                },
            },
            "encoding": {"files": {"contentType": "application/octet-stream"}},
            "example": {"name": "support-tickets-v3", "metadata": '{"team": "support"}'}},
            "application/json": {"schema": AdapterImport.model_json_schema()},
        },
    },
}
IMPORT_BODY_LIMIT = 64 * 1024


def _is_json(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def _import(request: Request, ctx: ServiceContext, tenant: str,
                  idempotency_key: str | None) -> AdapterPublic:
    body = await receive_small_body(request, limit=IMPORT_BODY_LIMIT)
    try:
        wanted = AdapterImport.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                      for err in e.errors(include_url=False)]) from e
    view = await run_in_threadpool(lambda: import_adapter(
        ctx=ctx, tenant=tenant, source=wanted.source, name=wanted.name,
        metadata=wanted.metadata, idempotency_key=idempotency_key))
    return AdapterPublic.model_validate(view)


@router.post("", status_code=201, response_model=AdapterPublic, openapi_extra=UPLOAD_BODY,
             summary="Upload an adapter, or import one by reference (JSON)",
             responses=problem_responses(401, 409, 413, 422, 429, 503))
async def upload_adapter(request: Request, ctx: ContextDep, settings: SettingsDep,
                         tenant: TenantDep,
                         idempotency_key: IdempotencyKeyDep = None) -> AdapterPublic:
    """Streams the upload to disk (413 past the size limit), validates every tensor, then
    publishes: a refused adapter is never stored or listed. A JSON body
    `{"source": "https://…" | "s3://…" | "hf://…"}` has the service fetch the adapter
    (only from sources the settings allow) and then treat it exactly as an upload."""
    if _is_json(request):
        return await _import(request, ctx, tenant, idempotency_key)
    metrics: Metrics = request.app.state.metrics
    spool = await run_in_threadpool(UploadSpool.create, ctx.spool_dir)
    budget = ByteBudget(settings.max_upload_bytes)
    try:
        started = time.perf_counter()
        await receive_upload(request, spool=spool, budget=budget,
                             drain_limit=settings.upload_drain_bytes)
        logger.info("upload of %d bytes received in %.2fs", budget.used,
                    time.perf_counter() - started)
        view = await run_in_threadpool(lambda: create_adapter(
            ctx=ctx, tenant=tenant, spool=spool, idempotency_key=idempotency_key))
        metrics.uploads.labels("accepted").inc()
    except LorafoldError as e:
        metrics.uploads.labels("refused" if status_for(e) < 500 else "failed").inc()
        raise
    except Exception:
        metrics.uploads.labels("failed").inc()
        raise
    finally:
        metrics.upload_bytes.inc(min(budget.used, budget.limit))
        await run_in_threadpool(spool.cleanup)
    return AdapterPublic.model_validate(view)


@router.get("", response_model=AdaptersPublic, summary="List the tenant's adapters",
            responses=problem_responses(401, 503))
def list_adapters(ctx: ContextDep, tenant: TenantDep) -> AdaptersPublic:
    views = service.list_adapters(store=ctx.adapters, tenant=tenant)
    return AdaptersPublic(data=[AdapterPublic.model_validate(v) for v in views],
                          count=len(views))


@router.get("/{adapter_id}", response_model=AdapterPublic, summary="Get one adapter",
            responses=problem_responses(401, 404, 503))
def get_adapter(adapter_id: str, ctx: ContextDep, tenant: TenantDep) -> AdapterPublic:
    return AdapterPublic.model_validate(
        service.get_adapter(store=ctx.adapters, tenant=tenant, adapter_id=adapter_id))


@router.delete("/{adapter_id}", status_code=204, summary="Delete an adapter",
               responses=problem_responses(401, 404, 409, 503))
def delete_adapter(adapter_id: str, ctx: ContextDep, tenant: TenantDep) -> Response:
    service.delete_adapter(ctx=ctx, tenant=tenant, adapter_id=adapter_id)
    return Response(status_code=204)


@router.get("/{adapter_id}/preflight", response_model=PreflightPublic,
            summary="Will a serving engine load this adapter?",
            responses=problem_responses(401, 404, 422, 503))
def preflight_adapter(adapter_id: str, ctx: ContextDep, tenant: TenantDep,
                      target: Literal["peft", "vllm", "lorax", "tgi"]) -> PreflightPublic:
    """A verdict per rule of the engine, with the fix (rules and sources: docs/serving.md);
    `ok: false` when it would not load."""
    return PreflightPublic.model_validate(service.preflight_adapter(
        store=ctx.adapters, tenant=tenant, adapter_id=adapter_id, target=target,
        spool=ctx.spool_dir))


@router.get("/{adapter_id}/download", summary="Download an adapter (.tar, .tar.gz or .zip)",
            response_class=StreamingResponse,
            responses={
                200: {"description": "the adapter's files at the root of an archive: tar "
                                     "(uncompressed), tar.gz or zip, as `format` asks",
                      "content": {media: {"schema": {"type": "string", "format": "binary"}}
                                  for media in MEDIA_TYPES.values()}},
                307: {"description": "format tar with S3 storage: a redirect to a presigned "
                                     "URL"},
                **problem_responses(401, 404, 422, 503)})
def download_adapter(adapter_id: str, ctx: ContextDep, settings: SettingsDep,
                     tenant: TenantDep,
                     archive_format: Annotated[str, Query(
                         alias="format", json_schema_extra={"enum": list(DOWNLOAD_FORMATS)},
                         description="tar (default; a presigned redirect on S3), or tar.gz / "
                                     "zip, built while streaming; another value: 422 "
                                     "unsupported_format")] = "tar") -> Response:
    download = open_archive_download(store=ctx.adapters, tenant=tenant, adapter_id=adapter_id,
                                     fmt=archive_format, expires_s=settings.presign_expires_s,
                                     signer=ctx.presign_storage)
    if download.url is not None:
        return RedirectResponse(download.url, status_code=307)
    assert download.stream is not None
    headers = {"Content-Disposition": f'attachment; filename="{download.filename}"'}
    if download.size is not None:
        headers["Content-Length"] = str(download.size)
    return StreamingResponse(download.stream, media_type=MEDIA_TYPES[archive_format],
                             headers=headers)
