"""The FastAPI application factory: `uvicorn app.main:create_app --factory`.

`create_app(settings)` builds everything once: the settings (from the environment when
not given), the service context (Redis pool, stores, storage), metrics, error handlers
and routers. Handlers get them through dependencies (`app/deps.py`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from app.errors import PROBLEM_MEDIA_TYPE, install_error_handlers
from app.metrics import Metrics, MetricsMiddleware
from app.routes import ROUTERS
from app.schemas import Problem
from lorafold import __version__
from lorafold.service.context import ServiceContext
from lorafold.service.validation import InProcessValidator, ProcessValidator, Validator
from lorafold.settings import Settings

DOCS_ASSETS = "/docs-assets"  # Swagger UI and ReDoc files, served by the API itself
DESCRIPTION = """\
Consolidate LoRA adapters (PEFT format): upload adapters, merge many into one low-rank
adapter with Compress-then-Merge (our reconstruction of He et al., ICML 2026) or a
baseline, follow the job, download the result.

**Auth**: `Authorization: Bearer <api key>`; each key belongs to one tenant and every
adapter and job is visible to its tenant only (another tenant's id answers 404).

**Errors**: `application/problem+json` (RFC 9457) with a stable `code`.

**Idempotency**: POSTs accept `Idempotency-Key`.
"""

TAGS = [
    {"name": "adapters", "description": "Upload, list, download and delete adapters."},
    {"name": "merges", "description": "Merge adapters into one (runs as a job)."},
    {"name": "plans", "description": "Plan which adapters to merge together (runs as a job)."},
    {"name": "jobs", "description": "Follow, list and cancel jobs."},
    {"name": "health", "description": "Liveness, readiness, metrics."},
]


def configure_logging(settings: Settings) -> None:
    """Our loggers at the configured level, to stderr, once per process."""
    root = logging.getLogger("lorafold")
    root.setLevel(settings.log_level)
    for name in ("app", "workers"):
        logging.getLogger(name).setLevel(settings.log_level)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")


VALIDATION_EXAMPLE = {
    "type": "urn:lorafold:problem:request_validation_failed", "title": HTTPStatus(422).phrase,
    "status": 422, "detail": "body.rank: Input should be a valid integer",
    "code": "request_validation_failed",
    "errors": [{"loc": ["body", "rank"], "msg": "Input should be a valid integer",
                "type": "int_parsing"}],
}


def _as_problem(status: str, response: dict[str, Any]) -> None:
    """Declare an error response as application/problem+json with the Problem schema."""
    content = response.setdefault("content", {})
    content.pop("application/json", None)
    entry = content.setdefault(PROBLEM_MEDIA_TYPE, {})
    entry["schema"] = {"$ref": "#/components/schemas/Problem"}
    if status == "422" and "example" not in entry:
        entry["example"] = VALIDATION_EXAMPLE


def _problem_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with every error response as application/problem+json (FastAPI
    would declare its own HTTPValidationError shape for 422s, which we never send)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes, tags=app.openapi_tags)
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            if path.startswith("/v1/"):
                operation["security"] = [{"bearerAuth": []}]
            for status, response in operation.get("responses", {}).items():
                if status[0] in "45":
                    _as_problem(status, response)
    schema.setdefault("components", {})["securitySchemes"] = {"bearerAuth": {
        "type": "http", "scheme": "bearer",
        "description": "API key: `Authorization: Bearer <key>`; each key belongs to one "
                       "tenant"}}
    components = schema["components"].setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    components.setdefault("Problem", Problem.model_json_schema(
        ref_template="#/components/schemas/{model}"))
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings | None = None, *,
               context: ServiceContext | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    settings.require_api_keys()  # only the API authenticates: workers start without keys
    configure_logging(settings)
    if context is None:
        validator: Validator = (ProcessValidator(settings.validation_processes)
                                if settings.validation_processes else InProcessValidator())
        context = ServiceContext(settings, validator=validator)
    ctx = context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(ctx.validator, ProcessValidator):
            await run_in_threadpool(ctx.validator.start)
        yield
        await run_in_threadpool(ctx.close)

    # /docs and /redoc with their assets served from the fastapi-offline package: no CDN,
    # so the pages work air-gapped.
    app = FastAPIOffline(title="lorafold", version=__version__, description=DESCRIPTION,
                         openapi_tags=TAGS, lifespan=lifespan, static_url=DOCS_ASSETS)
    app.state.settings = settings
    app.state.context = ctx
    app.state.metrics = Metrics(ctx)
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = lambda: _problem_openapi(app)  # type: ignore[method-assign]
    return app
