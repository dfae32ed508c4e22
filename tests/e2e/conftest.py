"""Live stacks shared by the e2e tests (stopped after the last one): one Redis, one
SeaweedFS, a model directory with a tiny base model, and two lorafold deployments (S3
storage with two workers, filesystem storage with one), each an uvicorn process plus RQ
worker processes. Everything listens on free loopback ports and is stopped by PID."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorafold.servers.redis import RedisServer, start_redis
from lorafold.servers.seaweedfs import SeaweedFS, start_seaweedfs
from tests.e2e.stack import DATASET_LIMIT, IMPORT_BUCKET, Stack, start_stack
from tests.unlearn_world import save_base_model


@pytest.fixture(scope="package")
def e2e_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="package")
def e2e_redis(e2e_root: Path) -> Iterator[RedisServer]:
    server = start_redis(e2e_root / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="package")
def e2e_seaweedfs(e2e_root: Path) -> Iterator[SeaweedFS]:
    server = start_seaweedfs(e2e_root / "seaweedfs", access_key=f"e2e{secrets.token_hex(4)}",
                             secret_key=secrets.token_hex(20),
                             log_dir=e2e_root / "seaweedfs-logs")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="package")
def e2e_models(e2e_root: Path) -> Path:
    """The stacks' model directory, holding one tiny base model (tests.unlearn_world)."""
    root = e2e_root / "models"
    save_base_model(root)
    return root


def models_env(models: Path) -> dict[str, str]:
    return {"LORAFOLD_MODEL_DIRS": json.dumps([str(models)]), "LORAFOLD_USE_HF_CACHE": "false",
            "LORAFOLD_MAX_DATASET_BYTES": str(DATASET_LIMIT)}


@pytest.fixture(scope="package")
def s3_stack(e2e_root: Path, e2e_redis: RedisServer, e2e_seaweedfs: SeaweedFS,
             e2e_models: Path) -> Iterator[Stack]:
    s3 = e2e_seaweedfs
    storage_env = {**models_env(e2e_models), "LORAFOLD_STORAGE_URL": "s3://lorafold-e2e",
                   "LORAFOLD_S3_ENDPOINT_URL": s3.endpoint_url,
                   "LORAFOLD_S3_REGION": s3.region,
                   "LORAFOLD_S3_ACCESS_KEY": str(s3.access_key),
                   "LORAFOLD_S3_SECRET_KEY": str(s3.secret_key),
                   # imports by reference (tests/e2e/test_import_download_e2e.py)
                   "LORAFOLD_IMPORT_S3_BUCKETS": json.dumps([IMPORT_BUCKET]),
                   "LORAFOLD_IMPORT_ALLOWED_HOSTS": json.dumps(["127.0.0.1"])}
    stack = start_stack("s3", e2e_root / "s3-stack", redis_url=f"redis://127.0.0.1:"
                        f"{e2e_redis.port}/1", storage_env=storage_env, workers=2)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="package")
def fs_stack(e2e_root: Path, e2e_redis: RedisServer, e2e_models: Path) -> Iterator[Stack]:
    storage = e2e_root / "fs-storage"
    stack = start_stack("fs", e2e_root / "fs-stack",
                        redis_url=f"redis://127.0.0.1:{e2e_redis.port}/2",
                        storage_env={**models_env(e2e_models),
                                     "LORAFOLD_STORAGE_URL": str(storage)}, workers=1,
                        storage_root=storage)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(params=["fs", "s3"])
def stack(request: pytest.FixtureRequest) -> Stack:
    """Each test using it runs against both deployments."""
    fixture: Stack = request.getfixturevalue(f"{request.param}_stack")
    return fixture
