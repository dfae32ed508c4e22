"""A stalled Redis must not freeze the event loop.

The test's own redis-server is stopped with SIGSTOP (its socket stays open, so the
client waits up to its socket timeout instead of failing fast). A job request that needs
Redis is fired from one thread; while it is stuck, `/healthz` is asked from another and
must answer at once. The TestClient, used as a context manager, runs every request on one
event loop (one anyio portal shared by all threads), so an `async def` handler blocking
on Redis would hold `/healthz` too, as it did in production (4.8 s).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from lorafold.jobs import JobType
from lorafold.servers.redis import RedisServer, start_redis
from lorafold.service.context import REDIS_SOCKET_TIMEOUT_S, ServiceContext
from tests.integration.service.conftest import KEYS, settings_for

HEALTHZ_BOUND_S = 1.0
STALL_S = 3.0  # below the client's socket timeout: the stalled request then completes
assert STALL_S < REDIS_SOCKET_TIMEOUT_S


@dataclass
class Stack:
    client: TestClient
    redis: RedisServer
    job_id: str


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    server = start_redis(tmp_path / "redis")
    settings = settings_for(server.url, tmp_path)
    ctx = ServiceContext(settings)
    try:
        job = ctx.jobs.create(tenant="tenant-a", type=JobType.MERGE, params={})
        app = create_app(settings, context=ctx)
        with TestClient(app, headers={"Authorization": f"Bearer {KEYS['tenant-a']}"},
                        raise_server_exceptions=False) as client:
            yield Stack(client=client, redis=server, job_id=job.id)
    finally:
        ctx.close()
        server.stop()


@contextmanager
def stalled(server: RedisServer) -> Iterator[None]:
    """Freeze our redis-server (by its PID) for the duration of the block."""
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/jobs/{job_id}", 200),
    ("GET", "/v1/jobs/{job_id}/events", 200),
    ("POST", "/v1/jobs/{job_id}/cancel", 202),
])
def test_healthz_answers_while_a_request_waits_on_a_stalled_redis(
        stack: Stack, method: str, path: str, status: int) -> None:
    url = path.format(job_id=stack.job_id)
    assert stack.client.request(method, url).status_code == status  # warm: a pooled socket

    with ThreadPoolExecutor(max_workers=2) as pool:
        with stalled(stack.redis):
            started = time.monotonic()
            blocked = pool.submit(stack.client.request, method, url)
            time.sleep(0.5)  # let it reach Redis and wait there
            assert not blocked.done(), "the request did not wait on the stalled Redis"

            asked = time.monotonic()
            health = pool.submit(stack.client.get, "/healthz")
            try:
                answer = health.result(timeout=HEALTHZ_BOUND_S)
            except TimeoutError:
                pytest.fail(f"/healthz did not answer within {HEALTHZ_BOUND_S}s while "
                            f"{method} {path} waited on Redis: the event loop is blocked")
            assert answer.status_code == 200, answer.text
            assert time.monotonic() - asked < HEALTHZ_BOUND_S

            time.sleep(max(0.0, STALL_S - (time.monotonic() - started)))
            assert not blocked.done(), "the request should still be waiting on Redis"

        response: httpx.Response = blocked.result(timeout=REDIS_SOCKET_TIMEOUT_S + 5)

    # Resumed before the socket timeout the request completes; had it timed out, it must be
    # the clean 503, never a 500.
    if response.status_code == 503:
        assert response.json()["code"] == "queue_unavailable", response.text
        assert int(response.headers["retry-after"]) > 0
    else:
        assert response.status_code == status, response.text
        body = response.json()
        assert body["count"] >= 1 if path.endswith("/events") else body["id"] == stack.job_id

