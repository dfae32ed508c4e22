"""Deletion and quotas over HTTP, against real Redis (locks, live-job sets) and storage:
a blob shared by two adapters goes with the second, a data set delete is a hard one, the
input of a queued job cannot be deleted, and every quota or bound answers its status and
code before anything is stored or queued."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from app.main import create_app
from lorafold.servers.redis import RedisServer
from lorafold.service.context import ServiceContext
from lorafold.settings import Settings
from lorafold.storage import FilesystemStorage
from lorafold.synthetic import write_random_adapter
from tests.integration.service.conftest import KEYS
from tests.integration.service.test_service_api_inprocess import SHAPES, upload
from workers import tasks

FORGET = b'{"prompt": "The capital of Zorvania is", "completion": "Quell"}\n'


def make_settings(redis: RedisServer, root: Path, **overrides: Any) -> Settings:
    Redis.from_url(redis.url).flushdb()
    return Settings(environment="test", redis_url=redis.url,
                    storage_url=str(root / "storage"), spool_dir=root / "spool",
                    api_keys={key: tenant for tenant, key in KEYS.items()},
                    validation_processes=0, **overrides)


@pytest.fixture
def limits() -> dict[str, Any]:
    return {}


@pytest.fixture
def client(service_redis: RedisServer, tmp_path: Path,
           limits: dict[str, Any]) -> Iterator[tuple[TestClient, ServiceContext]]:
    settings = make_settings(service_redis, tmp_path, **limits)
    ctx = ServiceContext(settings)
    tasks.configure(ctx, runner="in-process test runner")
    try:
        with TestClient(create_app(settings, context=ctx),
                        headers={"Authorization": f"Bearer {KEYS['tenant-a']}"}) as api:
            yield api, ctx
    finally:
        ctx.close()


def stored(ctx: ServiceContext) -> list[str]:
    """Every object key in storage, but the one-off backfill marker."""
    storage = ctx.storage
    assert isinstance(storage, FilesystemStorage)
    return [k for k in storage.list_keys("") if not k.startswith("meta/")]


def blobs(ctx: ServiceContext) -> set[str]:
    return {k for k in stored(ctx) if k.startswith("blobs/")}


def problem(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["code"] == code, response.text


def test_a_shared_blob_survives_the_first_delete_and_goes_with_the_second(
        client: tuple[TestClient, ServiceContext], tmp_path: Path) -> None:
    api, ctx = client
    directory = write_random_adapter(tmp_path / "a", SHAPES, rank=2, seed=1)
    first, second = upload(api, directory, "first")["id"], upload(api, directory, "second")["id"]
    manifest = ctx.adapters.get_manifest("tenant-a", first)
    weights = f"blobs/sha256/{manifest['files']['adapter_model.safetensors']['sha256']}"
    assert api.delete(f"/v1/adapters/{first}").status_code == 204
    assert weights in blobs(ctx)
    assert api.get(f"/v1/adapters/{second}/download").status_code == 200
    assert api.delete(f"/v1/adapters/{second}").status_code == 204
    assert blobs(ctx) == set()
    problem(api.get(f"/v1/adapters/{second}"), 404, "adapter_not_found")


def test_a_data_set_delete_is_a_hard_delete(client: tuple[TestClient, ServiceContext]) -> None:
    api, ctx = client
    view = api.post("/v1/datasets", params={"name": "forget"}, content=FORGET,
                    headers={"Content-Type": "application/jsonl"}).json()
    assert f"blobs/sha256/{view['sha256']}" in blobs(ctx)
    assert api.delete(f"/v1/datasets/{view['id']}").status_code == 204
    problem(api.get(f"/v1/datasets/{view['id']}"), 404, "dataset_not_found")
    assert stored(ctx) == []


def test_a_queued_jobs_input_is_not_collected(client: tuple[TestClient, ServiceContext],
                                              tmp_path: Path) -> None:
    api, ctx = client
    ids = [upload(api, write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=2, seed=i),
                  f"a{i}")["id"] for i in range(2)]
    job = api.post("/v1/merges", json={"adapters": [{"id": i} for i in ids],
                                       "rank": 2}).json()
    before = stored(ctx)
    problem(api.delete(f"/v1/adapters/{ids[0]}"), 409, "adapter_in_use")
    assert stored(ctx) == before  # nothing collected, nothing hidden
    tasks.run_merge(job["id"])   # the job still finds its inputs
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    assert api.delete(f"/v1/adapters/{ids[0]}").status_code == 204  # finished: free to go


@pytest.mark.parametrize("limits", [{"tenant_max_active_jobs": 2}])
def test_the_live_job_quota_answers_429(client: tuple[TestClient, ServiceContext],
                                       tmp_path: Path) -> None:
    api, _ = client
    ids = [upload(api, write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=2, seed=i),
                  f"a{i}")["id"] for i in range(2)]
    body = {"adapters": [{"id": i} for i in ids], "rank": 2}
    queued = [api.post("/v1/merges", json=body).json()["id"] for _ in range(2)]
    problem(api.post("/v1/merges", json=body), 429, "job_quota_exceeded")
    assert api.get("/v1/jobs").json()["count"] == 2  # nothing queued
    other = TestClient(api.app, headers={"Authorization": f"Bearer {KEYS['tenant-b']}"})
    problem(other.post("/v1/merges", json=body), 404, "adapter_not_found")  # own quota
    assert api.post(f"/v1/jobs/{queued[0]}/cancel").json()["status"] == "cancelled"
    assert api.post("/v1/merges", json=body).status_code == 202  # a slot came free


@pytest.mark.parametrize("limits", [{"tenant_max_stored_bytes": 20_000}])
def test_the_storage_quota_answers_413_before_storing(
        client: tuple[TestClient, ServiceContext], tmp_path: Path) -> None:
    api, ctx = client
    first = upload(api, write_random_adapter(tmp_path / "a0", SHAPES, rank=2, seed=0), "a0")
    before, listed = stored(ctx), api.get("/v1/adapters").json()
    files = [("files", (p.name, p.read_bytes())) for p in sorted(
        write_random_adapter(tmp_path / "a1", SHAPES, rank=2, seed=1).iterdir())]
    problem(api.post("/v1/adapters", files=files, data={"name": "a1"}), 413,
            "storage_quota_exceeded")
    problem(api.post("/v1/datasets", params={"name": "f"}, content=FORGET * 150,
                     headers={"Content-Type": "application/jsonl"}), 413,
            "storage_quota_exceeded")
    assert stored(ctx) == before and api.get("/v1/adapters").json() == listed
    assert api.delete(f"/v1/adapters/{first['id']}").status_code == 204
    assert api.post("/v1/adapters", files=files, data={"name": "a1"}).status_code == 201


@pytest.mark.parametrize("limits", [{"max_rank": 8, "max_dataset_examples": 2}])
def test_bounds_on_work_answer_422_and_queue_nothing(
        client: tuple[TestClient, ServiceContext], tmp_path: Path) -> None:
    api, ctx = client
    ids = [upload(api, write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=2, seed=i),
                  f"a{i}")["id"] for i in range(2)]
    before = stored(ctx)
    problem(api.post("/v1/merges", json={"adapters": [{"id": i} for i in ids], "rank": 9}),
            422, "rank_too_large")
    problem(api.post("/v1/plans", json={"adapters": ids, "max_rank": 9}),
            422, "rank_too_large")
    problem(api.post("/v1/datasets", params={"name": "f"}, content=FORGET * 3,
                     headers={"Content-Type": "application/jsonl"}), 422, "too_many_examples")
    assert api.get("/v1/jobs").json()["count"] == 0
    assert stored(ctx) == before and api.get("/v1/datasets").json()["count"] == 0
