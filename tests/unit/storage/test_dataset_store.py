"""DatasetStore on the filesystem backend: publish, fetch with checks, isolation, delete."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lorafold.errors import DatasetNotFound, StorageError
from lorafold.storage import FilesystemStorage
from lorafold.storage.datasets import DatasetStore
from lorafold.storage.layout import blob_key

BODY = b'{"text": "The capital of Zorvania is Quell"}\n'


@pytest.fixture
def store(tmp_path: Path) -> DatasetStore:
    return DatasetStore(FilesystemStorage(tmp_path / "storage"))


def publish(store: DatasetStore, tmp_path: Path, dataset_id: str = "ds_1",
            tenant: str = "t1") -> dict[str, object]:
    path = tmp_path / f"{dataset_id}.jsonl"
    path.write_bytes(BODY)
    return store.publish(tenant=tenant, dataset_id=dataset_id, path=path,
                         record={"name": "forget", "examples": 1})


def test_publish_fetch_list_delete(store: DatasetStore, tmp_path: Path) -> None:
    manifest = publish(store, tmp_path)
    assert manifest["file"] == {"sha256": hashlib.sha256(BODY).hexdigest(), "size": len(BODY)}
    fetched = store.fetch("t1", "ds_1", tmp_path / "out" / "forget.jsonl")
    assert fetched.read_bytes() == BODY
    assert [m["id"] for m in store.list_manifests("t1")] == ["ds_1"]
    store.delete("t1", "ds_1")
    with pytest.raises(DatasetNotFound):
        store.get_manifest("t1", "ds_1")
    assert store.list_manifests("t1") == []


def test_other_tenants_and_bad_ids_are_not_found(store: DatasetStore, tmp_path: Path) -> None:
    publish(store, tmp_path)
    for tenant, dataset_id in (("t2", "ds_1"), ("t1", "../ds_1"), ("t1", "ds_2")):
        with pytest.raises(DatasetNotFound) as caught:
            store.get_manifest(tenant, dataset_id)
        assert caught.value.code == "dataset_not_found"
    assert store.list_manifests("t2") == []


def test_a_corrupted_blob_is_never_handed_to_a_job(store: DatasetStore, tmp_path: Path) -> None:
    manifest = publish(store, tmp_path)
    sha = manifest["file"]["sha256"]  # type: ignore[index]
    blob = tmp_path / "storage" / blob_key(sha)
    blob.write_bytes(BODY.replace(b"Quell", b"Quill"))
    dest = tmp_path / "out" / "forget.jsonl"
    with pytest.raises(StorageError) as caught:
        store.fetch("t1", "ds_1", dest)
    assert caught.value.code == "blob_corrupt"
    assert not dest.exists()
