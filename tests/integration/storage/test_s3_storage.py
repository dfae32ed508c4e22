"""S3-specific behaviour against a real SeaweedFS: multipart, abort, presigned URLs, auth."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorafold.errors import StorageError
from lorafold.servers.process import free_port
from lorafold.servers.seaweedfs import SeaweedFS
from lorafold.storage import resolve_storage
from lorafold.storage.adapters import AdapterStore
from lorafold.storage.s3 import DEFAULT_PART_SIZE, S3Storage

MIB = 1024 * 1024


def random_chunks(total: int, chunk: int = MIB, seed: int = 0) -> Iterator[bytes]:
    rng = random.Random(seed)
    for start in range(0, total, chunk):
        yield rng.randbytes(min(chunk, total - start))


def open_uploads(s3_client: Any, storage: S3Storage) -> list[dict[str, Any]]:
    response = s3_client.list_multipart_uploads(Bucket=storage.bucket, Prefix=storage.prefix)
    uploads: list[dict[str, Any]] = response.get("Uploads", [])
    return uploads


def test_large_stream_goes_up_in_parts(s3_storage: S3Storage, s3_client: Any) -> None:
    total = 20 * MIB + 12345  # three parts of 8 MiB, the last one short
    expected = hashlib.sha256()
    for chunk in random_chunks(total):
        expected.update(chunk)
    result = s3_storage.put_stream("big.bin", random_chunks(total))
    assert (result.size, result.sha256) == (total, expected.hexdigest())
    head = s3_client.head_object(Bucket=s3_storage.bucket, Key=s3_storage.prefix + "big.bin")
    assert head["ContentLength"] == total
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag: 3 parts
    read = hashlib.sha256()
    for chunk in s3_storage.open_stream("big.bin"):
        read.update(chunk)
    assert read.hexdigest() == result.sha256
    assert open_uploads(s3_client, s3_storage) == []


def test_failure_mid_multipart_aborts_the_upload(s3_storage: S3Storage,
                                                 s3_client: Any) -> None:
    def broken() -> Iterator[bytes]:
        yield from random_chunks(DEFAULT_PART_SIZE + 2 * MIB)  # one part already sent
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        s3_storage.put_stream("half.bin", broken())
    assert not s3_storage.exists("half.bin")
    assert list(s3_storage.list_keys("")) == []
    assert open_uploads(s3_client, s3_storage) == []


def test_presigned_url_serves_the_bytes(s3_storage: S3Storage) -> None:
    data = random.Random(3).randbytes(50_000)
    s3_storage.put_bytes("blobs/x", data)
    url = s3_storage.presigned_url("blobs/x", 60, filename="adapter.zip")
    assert url is not None
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == data
    assert 'filename="adapter.zip"' in response.headers.get("content-disposition", "")
    tampered = url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert httpx.get(tampered).status_code == 403


def test_wrong_credentials_are_storage_errors(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    options = {**seaweedfs.storage_options(), "secret_key": "not-the-secret"}
    with pytest.raises(StorageError):
        S3Storage(s3_bucket, **options)  # create_bucket checks the bucket
    storage = S3Storage(s3_bucket, create_bucket=False, **options)
    with pytest.raises(StorageError) as info:
        storage.ping()
    assert "not-the-secret" not in str(info.value)
    with pytest.raises(StorageError):
        storage.put_bytes("k", b"x")
    with pytest.raises(StorageError):
        storage.get_bytes("k")


def test_unreachable_endpoint_is_a_storage_error() -> None:
    storage = S3Storage("nowhere", endpoint_url=f"http://127.0.0.1:{free_port()}",
                        access_key="a", secret_key="b", create_bucket=False,
                        connect_timeout=1, max_attempts=1)
    with pytest.raises(StorageError):
        storage.ping()


def test_prefixes_isolate_and_resolve(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    options = seaweedfs.storage_options()
    one = resolve_storage(f"s3://{s3_bucket}/iso-one/", **options)
    two = resolve_storage(f"s3://{s3_bucket}/iso-two", **options)
    assert isinstance(one, S3Storage) and one.prefix == "iso-one/"
    one.put_bytes("k", b"1")
    assert not two.exists("k")
    assert list(two.list_keys("")) == []
    whole = S3Storage(s3_bucket, create_bucket=False, **options)
    assert whole.get_bytes("iso-one/k") == b"1"


def test_resolve_creates_missing_bucket(seaweedfs: SeaweedFS) -> None:
    storage = resolve_storage("s3://lorafold-fresh-bucket", **seaweedfs.storage_options())
    storage.ping()


def test_adapter_store_on_s3(s3_storage: S3Storage, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    files = {"adapter_config.json": b'{"r": 4}',
             "adapter_model.safetensors": random.Random(5).randbytes(300_000)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(b"not really a tarball, the store does not look inside")
    store = AdapterStore(s3_storage)
    store.publish(tenant="t1", adapter_id="ad1", files={n: src / n for n in files},
                  archive=archive, record={"name": "s3"})
    store.publish(tenant="t1", adapter_id="ad2", files={n: src / n for n in files},
                  archive=archive, record={"name": "same bytes"})
    assert [m["id"] for m in store.list_manifests("t1")] == ["ad2", "ad1"]
    url = store.archive_url("t1", "ad1", expires_s=60)
    assert url is not None
    response = httpx.get(url)
    assert response.content == archive.read_bytes()
    assert 'filename="ad1.tar.gz"' in response.headers["content-disposition"]
    out = store.fetch_files("t1", "ad1", tmp_path / "out")
    for name, data in files.items():
        assert (out / name).read_bytes() == data
    keys = list(s3_storage.list_keys(""))
    assert len([k for k in keys if k.startswith("blobs/")]) == 3  # shared by both adapters
    assert not [k for k in keys if k.startswith("tmp/")]
