"""A real SeaweedFS S3 server for the storage tests, with credentials enforced.

One `weed mini` per test session on free loopback ports, stopped by PID at the end. Each
test gets its own key prefix in one shared bucket (SeaweedFS gives every bucket its own
volumes, so a bucket per test would be slow and run out of volume slots).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from lorafold.servers.seaweedfs import SeaweedFS, start_seaweedfs
from lorafold.storage import FilesystemStorage, Storage
from lorafold.storage.s3 import S3Storage

BUCKET = "lorafold-test"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    root = tmp_path_factory.mktemp("seaweedfs")
    server = start_seaweedfs(root / "data", access_key=f"test-{secrets.token_hex(4)}",
                             secret_key=secrets.token_hex(20), log_dir=root / "logs")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_client(seaweedfs: SeaweedFS) -> Any:
    """A plain boto3 client, to inspect the server independently of S3Storage."""
    return boto3.session.Session().client(
        "s3", endpoint_url=seaweedfs.endpoint_url, region_name=seaweedfs.region,
        aws_access_key_id=seaweedfs.access_key, aws_secret_access_key=seaweedfs.secret_key,
        config=Config(s3={"addressing_style": "path"},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"))


@pytest.fixture(scope="session")
def s3_bucket(seaweedfs: SeaweedFS) -> str:
    S3Storage(BUCKET, create_bucket=True, **seaweedfs.storage_options())
    return BUCKET


@pytest.fixture
def s3_storage(seaweedfs: SeaweedFS, s3_bucket: str) -> S3Storage:
    """S3Storage below a fresh prefix: tests cannot see each other's objects."""
    return S3Storage(s3_bucket, prefix=f"test-{uuid.uuid4().hex[:12]}", create_bucket=False,
                     **seaweedfs.storage_options())


@pytest.fixture(params=["filesystem", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """Each backend in turn; the contract tests run once per backend."""
    if request.param == "filesystem":
        return FilesystemStorage(tmp_path / "store")
    backend: S3Storage = request.getfixturevalue("s3_storage")
    return backend
