"""A real Redis (one per session, flushed per test) and filesystem storage, with the API
app served in-process (Starlette's TestClient) and jobs run in-process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from app.main import create_app
from lorafold.servers.redis import RedisServer, start_redis
from lorafold.service.context import ServiceContext
from lorafold.settings import Settings
from workers import tasks

KEYS = {"tenant-a": "int-key-tenant-a-0123456789", "tenant-b": "int-key-tenant-b-0123456789"}


@pytest.fixture(scope="session")
def service_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("service-redis"))
    try:
        yield server
    finally:
        server.stop()


def settings_for(redis_url: str, root: Path) -> Settings:
    """Test settings on one Redis, with storage and spool under `root` (the tests' keys)."""
    return Settings(environment="test", redis_url=redis_url,
                    storage_url=str(root / "storage"), spool_dir=root / "spool",
                    api_keys={key: tenant for tenant, key in KEYS.items()},
                    validation_processes=0)


@pytest.fixture
def settings(service_redis: RedisServer, tmp_path: Path) -> Settings:
    Redis.from_url(service_redis.url).flushdb()
    return Settings(environment="test", redis_url=service_redis.url,
                    storage_url=str(tmp_path / "storage"), spool_dir=tmp_path / "spool",
                    api_keys={key: tenant for tenant, key in KEYS.items()},
                    validation_processes=0, job_retries=1,
                    job_monitoring_interval_s=1, abandoned_after_s=3)


@pytest.fixture
def ctx(settings: Settings) -> Iterator[ServiceContext]:
    context = ServiceContext(settings)
    tasks.configure(context, runner="in-process test runner")
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def api(settings: Settings, ctx: ServiceContext) -> Iterator[TestClient]:
    app = create_app(settings, context=ctx)
    with TestClient(app, headers={"Authorization": f"Bearer {KEYS['tenant-a']}"}) as client:
        yield client
