"""Bearer keys → tenants, and the one table mapping errors to HTTP statuses."""

from __future__ import annotations

import pytest

from app.errors import problem_body, status_for
from lorafold import errors
from lorafold.service.auth import Unauthenticated, tenant_for
from lorafold.settings import Settings

KEY = "unit-test-key-0123456789abcdef"


@pytest.fixture
def settings() -> Settings:
    return Settings(api_keys={KEY: "tenant-a"})


def test_valid_key_gives_its_tenant(settings: Settings) -> None:
    assert tenant_for(settings, f"Bearer {KEY}") == "tenant-a"
    assert tenant_for(settings, f"bearer  {KEY} ") == "tenant-a"


@pytest.mark.parametrize("header, code", [
    (None, "missing_api_key"), ("", "missing_api_key"),
    (f"Basic {KEY}", "invalid_authorization"), ("Bearer", "invalid_authorization"),
    ("Bearer wrong-key", "invalid_api_key"),
])
def test_bad_headers_are_unauthenticated(settings: Settings, header: str | None,
                                         code: str) -> None:
    with pytest.raises(Unauthenticated) as err:
        tenant_for(settings, header)
    assert err.value.code == code


@pytest.mark.parametrize("error, status", [
    (Unauthenticated("x"), 401),
    (errors.AdapterNotFound("x"), 404),
    (errors.JobNotFound("x"), 404),
    (errors.Conflict("x", code="idempotency_key_reused"), 409),
    (errors.PayloadTooLarge("x"), 413),
    (errors.InvalidAdapter("x", code="non_finite"), 422),
    (errors.UnknownRule("x"), 422),
    (errors.IncompatibleAdapters("x"), 422),
    (errors.NumericalError("x"), 422),
    (errors.StorageError("x"), 503),
    (errors.LorafoldError("x"), 500),
])
def test_status_of_each_error_class(error: errors.LorafoldError, status: int) -> None:
    assert status_for(error) == status


def test_problem_shape() -> None:
    body = problem_body(404, "adapter_not_found", "adapter 'a' not found")
    assert body == {"type": "urn:lorafold:problem:adapter_not_found", "title": "Not Found",
                    "status": 404, "detail": "adapter 'a' not found",
                    "code": "adapter_not_found"}
