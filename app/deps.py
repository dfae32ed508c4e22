"""Dependencies as `Annotated` aliases, so handlers stay short and typed.

They are `async def` on purpose: they do no I/O, and FastAPI runs sync dependencies in
its thread pool, which would cost a thread hop each on every request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from lorafold.service.auth import tenant_for
from lorafold.service.context import ServiceContext
from lorafold.settings import Settings


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_context(request: Request) -> ServiceContext:
    context: ServiceContext = request.app.state.context
    return context


SettingsDep = Annotated[Settings, Depends(get_settings)]
ContextDep = Annotated[ServiceContext, Depends(get_context)]


async def get_tenant(request: Request) -> str:
    """The caller's tenant from `Authorization: Bearer <key>`, else 401. (Declared in the
    OpenAPI schema as the `bearerAuth` scheme by app.main.)"""
    return tenant_for(request.app.state.settings, request.headers.get("authorization"))


TenantDep = Annotated[str, Depends(get_tenant)]
IdempotencyKeyDep = Annotated[str | None, Header(
    alias="Idempotency-Key", max_length=255,
    description="Same key and same body: the first answer again. Same key, another body: "
                "409 idempotency_key_reused. Kept for 24 h.")]
