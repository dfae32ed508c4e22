"""/healthz (process up), /readyz (Redis and storage reachable), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from app.deps import ContextDep
from app.errors import problem, problem_responses
from app.schemas import HealthPublic, ReadyPublic
from lorafold.service.health import readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic, summary="Liveness")
async def healthz() -> HealthPublic:
    # Touches nothing, so it stays on the event loop: it answers even when every pool
    # thread is stuck on a stalled Redis. Handlers doing blocking I/O are plain `def`.
    return HealthPublic()


@router.get("/readyz", response_model=ReadyPublic, summary="Readiness",
            responses=problem_responses(503))
def readyz(ctx: ContextDep) -> Response | ReadyPublic:
    checks = readiness(ctx=ctx)
    if all(value == "ok" for value in checks.values()):
        return ReadyPublic(status="ready", checks=checks)
    failing = ", ".join(f"{name} {value}" for name, value in checks.items() if value != "ok")
    return problem(503, "not_ready", f"not ready: {failing}", checks=checks)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    payload = await run_in_threadpool(generate_latest, registry)
    return Response(payload, media_type=CONTENT_TYPE_LATEST)

