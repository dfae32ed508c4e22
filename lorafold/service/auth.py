"""Bearer API keys → tenants. Keys are looked up by their sha256 (see settings)."""

from __future__ import annotations

from lorafold.errors import LorafoldError
from lorafold.settings import Settings, key_digest


class Unauthenticated(LorafoldError):
    """No API key, or one that maps to no tenant (HTTP 401)."""

    code = "unauthenticated"


def tenant_for(settings: Settings, authorization: str | None) -> str:
    """The tenant of an `Authorization: Bearer <key>` header, or Unauthenticated."""
    if not authorization:
        raise Unauthenticated("missing Authorization header; send 'Authorization: Bearer "
                              "<api key>'", code="missing_api_key")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("Authorization must be 'Bearer <api key>'",
                              code="invalid_authorization")
    tenant = settings.tenant_for_digest(key_digest(key.strip()))
    if tenant is None:
        raise Unauthenticated("the API key is not valid", code="invalid_api_key")
    return tenant
