"""The one place where errors become HTTP: status codes and application/problem+json.

Every error response, including FastAPI's own (404 unknown route, 405, 422 request
validation) and unexpected failures (500), is an RFC 9457 problem document with a stable
machine-readable `code`: clients branch on `code`, people read `detail`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafold.errors import (
    Busy,
    Conflict,
    IncompatibleAdapters,
    InvalidAdapter,
    InvalidDataset,
    InvalidRequest,
    JobCancelled,
    LorafoldError,
    NotFound,
    NumericalError,
    PayloadTooLarge,
    QuotaExceeded,
    StorageError,
)
from lorafold.service.auth import Unauthenticated

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:lorafold:problem:"

# Error class → HTTP status. Order matters: the first class an error is an instance of wins.
STATUS_BY_ERROR: Sequence[tuple[type[LorafoldError], int]] = (
    (Unauthenticated, 401),
    (NotFound, 404),
    (Conflict, 409),
    (JobCancelled, 409),
    (PayloadTooLarge, 413),
    (Busy, 429),
    (InvalidAdapter, 422),
    (IncompatibleAdapters, 422),
    (InvalidRequest, 422),
    (InvalidDataset, 422),
    (NumericalError, 422),
    (QuotaExceeded, 429),
    (StorageError, 503),
)
CODE_BY_STATUS: Mapping[int, str] = {
    400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
    413: "payload_too_large", 415: "unsupported_media_type", 422: "request_validation_failed",
    429: "too_many_requests", 500: "internal_error", 503: "service_unavailable",
}


def status_for(error: LorafoldError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return status
    return 500


def problem_body(status: int, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": PROBLEM_TYPE_PREFIX + code, "title": HTTPStatus(status).phrase,
            "status": status, "detail": detail, "code": code, **extra}


def problem(status: int, code: str, detail: str, *, headers: Mapping[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    return JSONResponse(jsonable_encoder(problem_body(status, code, detail, **extra)),
                        status_code=status, media_type=PROBLEM_MEDIA_TYPE,
                        headers=dict(headers or {}))


async def lorafold_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LorafoldError)
    status = status_for(exc)
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="lorafold"'
    if status == 413:
        headers["Connection"] = "close"
    if status == 429:
        headers["Retry-After"] = RETRY_AFTER_S
    if status >= 500:
        logger.error("%s %s failed: %s: %s", request.method, request.url.path, exc.code,
                     exc.message)
    return problem(status, exc.code, exc.message, headers=headers)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = CODE_BY_STATUS.get(status, f"http_{status}")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    if status == 404 and detail == "Not Found":
        detail = f"no route for {request.method} {request.url.path}"
    if status == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return problem(status, code, detail, headers=exc.headers)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
               "type": str(e.get("type", ""))} for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    detail = f"{where}: {first['msg']}" if where else str(first["msg"])
    return problem(422, "request_validation_failed", detail, errors=errors)


# Redis (job records, the queue, idempotency claims) out of reach: the request may be
# retried once it is back, so 503 with a code, not a 500.
REDIS_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, BusyLoadingError)
RETRY_AFTER_S = "5"


async def redis_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.error("%s %s: Redis unavailable: %s", request.method, request.url.path, exc)
    return problem(503, "queue_unavailable", "the job store (Redis) cannot be reached; retry "
                   "shortly", headers={"Retry-After": RETRY_AFTER_S})


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s: unexpected error", request.method, request.url.path)
    return problem(500, "internal_error", "an unexpected error occurred; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LorafoldError, lorafold_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    for error in REDIS_UNAVAILABLE:
        app.add_exception_handler(error, redis_unavailable_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the given error statuses, with an example each."""
    from app.schemas import Problem

    examples = {
        401: ("invalid_api_key", "the API key is not valid"),
        404: ("adapter_not_found", "adapter 'ad_0123' not found"),
        409: ("idempotency_key_reused",
              "Idempotency-Key 'k1' was already used with a different body"),
        413: ("payload_too_large", "the upload exceeds the limit of 2147483648 bytes"),
        422: ("non_finite", "base_model.model.layers.0.q_proj.lora_A.weight: contains NaN "
                            "or Inf values"),
        503: ("storage_error", "S3 could not reach bucket in s3://lorafold"),
    }
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        code, detail = examples.get(status, (CODE_BY_STATUS.get(status, "error"), "..."))
        out[status] = {
            "model": Problem,
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_MEDIA_TYPE: {"example": problem_body(status, code, detail)}},
        }
    return out
