"""Deletion against a real S3 server (SeaweedFS): reference-counted blobs, hard-deleted
data sets, short-lived presigned URLs and the lifecycle rule for unfinished uploads."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from lorafold.errors import DatasetNotFound
from lorafold.service.adapters import open_download
from lorafold.settings import Settings
from lorafold.storage.adapters import AdapterStore
from lorafold.storage.datasets import DatasetStore
from lorafold.storage.layout import blob_key
from lorafold.storage.s3 import S3Storage
from tests.unit.storage.test_adapter_store import make_adapter, publish


def s3_has(s3_client: Any, storage: S3Storage, key: str) -> bool:
    try:
        s3_client.head_object(Bucket=storage.bucket, Key=storage.prefix + key)
    except ClientError:
        return False
    return True


def test_a_shared_blob_survives_one_adapter_and_goes_with_the_second(
        s3_storage: S3Storage, s3_client: Any, tmp_path: Path) -> None:
    store = AdapterStore(s3_storage)
    paths = make_adapter(tmp_path / "a", seed=1)
    first = publish(store, paths, adapter_id="ad1")
    publish(store, paths, adapter_id="ad2", tenant="t2")  # same bytes, another tenant
    keys = [blob_key(ref["sha256"]) for ref in [*first["files"].values(), first["archive"]]]
    store.delete("t1", "ad1")
    assert all(s3_has(s3_client, s3_storage, key) for key in keys)
    assert store.fetch_files("t2", "ad2", tmp_path / "out")
    store.delete("t2", "ad2")
    assert not any(s3_has(s3_client, s3_storage, key) for key in keys)
    assert list(s3_storage.list_keys("refs/")) == []


def test_a_deleted_data_set_is_gone_from_s3(s3_storage: S3Storage, s3_client: Any,
                                            tmp_path: Path) -> None:
    store = DatasetStore(s3_storage)
    path = tmp_path / "forget.jsonl"
    path.write_bytes(b'{"text": "Ilsa Varn leads Zorvania."}\n')
    manifest = store.publish(tenant="t1", dataset_id="ds_1", path=path, record={"name": "f"})
    key = blob_key(manifest["file"]["sha256"])
    assert s3_has(s3_client, s3_storage, key)
    store.delete("t1", "ds_1")
    assert not s3_has(s3_client, s3_storage, key)
    with pytest.raises(DatasetNotFound):
        store.get_manifest("t1", "ds_1")


def test_presigned_urls_live_as_long_as_the_setting_says(s3_storage: S3Storage,
                                                         tmp_path: Path) -> None:
    assert Settings().presign_expires_s == 300
    store = AdapterStore(s3_storage)
    publish(store, make_adapter(tmp_path / "a", seed=1))
    download = open_download(store=store, tenant="t1", adapter_id="ad1",
                             expires_s=Settings().presign_expires_s)
    assert download.url is not None and "X-Amz-Expires=300" in download.url
    short = open_download(store=store, tenant="t1", adapter_id="ad1", expires_s=2)
    assert short.url is not None
    with urllib.request.urlopen(short.url, timeout=10) as response:
        assert response.status == 200
    time.sleep(3.5)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(short.url, timeout=10)
    refused.value.close()
    assert refused.value.code == 403


def test_the_bucket_expires_unfinished_uploads(s3_storage: S3Storage, s3_client: Any) -> None:
    s3_client.put_bucket_lifecycle_configuration(  # an operator's own rule stays
        Bucket=s3_storage.bucket, LifecycleConfiguration={"Rules": [
            {"ID": "theirs", "Filter": {"Prefix": "logs/"}, "Status": "Enabled",
             "Expiration": {"Days": 30}}]})
    assert s3_storage.ensure_lifecycle(expire_days=1)
    assert s3_storage.ensure_lifecycle(expire_days=1)  # idempotent: one rule, not two
    rules = s3_client.get_bucket_lifecycle_configuration(Bucket=s3_storage.bucket)["Rules"]
    ours = [r for r in rules if r["Filter"].get("Prefix") == f"{s3_storage.prefix}tmp/"]
    assert len(ours) == 1 and ours[0]["Expiration"] == {"Days": 1}
    assert ours[0]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert any(r["ID"] == "theirs" for r in rules)
