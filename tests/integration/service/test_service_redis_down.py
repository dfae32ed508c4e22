"""Redis out of reach: every route that needs it answers 503 `queue_unavailable` with
Retry-After, not 500; routes that do not need it keep working."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from lorafold.servers.redis import start_redis
from lorafold.service.context import ServiceContext
from tests.integration.service.conftest import KEYS, settings_for


@pytest.fixture
def api_without_redis(tmp_path: Path) -> Iterator[TestClient]:
    server = start_redis(tmp_path / "redis")
    settings = settings_for(server.url, tmp_path)
    ctx = ServiceContext(settings)
    try:
        app = create_app(settings, context=ctx)
        with TestClient(app, headers={"Authorization": f"Bearer {KEYS['tenant-a']}"},
                        raise_server_exceptions=False) as client:
            server.stop()
            yield client
    finally:
        ctx.close()
        server.stop()


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/v1/jobs", None),
    ("GET", "/v1/jobs/job_0123456789abcdef/events", None),
    ("POST", "/v1/jobs/job_0123456789abcdef/cancel", None),
    # the idempotency claim is the first thing a keyed merge needs from Redis
    ("POST", "/v1/merges", {"adapters": [{"id": "ad_0123456789abcdef0123456789abcdef"}],
                            "rank": 4}),
])
def test_redis_down_is_a_503_with_a_code(api_without_redis: TestClient, method: str, path: str,
                                         body: dict[str, object] | None) -> None:
    response = api_without_redis.request(method, path, json=body,
                                         headers={"Idempotency-Key": "redis-down-1"})
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "queue_unavailable"
    assert response.headers["content-type"].startswith("application/problem+json")
    assert int(response.headers["retry-after"]) > 0


def test_healthz_does_not_need_redis(api_without_redis: TestClient) -> None:
    assert api_without_redis.get("/healthz").status_code == 200
