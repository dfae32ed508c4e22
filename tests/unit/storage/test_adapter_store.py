"""AdapterStore on the filesystem backend: publish, read, isolation, atomicity, dedup."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from lorafold.errors import AdapterNotFound, InvalidRequest, StorageError
from lorafold.storage import FilesystemStorage, PutResult
from lorafold.storage.adapters import AdapterStore

FILE_NAMES = ("adapter_config.json", "adapter_model.safetensors", "lorafold.json")


def make_adapter(root: Path, seed: int, *, weights: bytes | None = None) -> dict[str, Path]:
    """Files of a (fake-content) adapter plus its zip archive; contents differ by seed."""
    root.mkdir(parents=True)
    contents = {
        "adapter_config.json": json.dumps({"r": 8, "lora_alpha": 16}).encode(),
        "adapter_model.safetensors": weights if weights is not None
        else hashlib.sha256(str(seed).encode()).digest() * 4096,
        "lorafold.json": json.dumps({"seed": seed}).encode(),
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = root / name
        paths[name].write_bytes(data)
    with zipfile.ZipFile(root / "adapter.zip", "w") as archive:
        for name, path in paths.items():
            archive.write(path, name)
    paths["archive"] = root / "adapter.zip"
    return paths


def publish(store: AdapterStore, paths: dict[str, Path], *, tenant: str = "t1",
            adapter_id: str = "ad1", name: str = "first") -> dict[str, Any]:
    files = {n: paths[n] for n in FILE_NAMES}
    return store.publish(tenant=tenant, adapter_id=adapter_id, files=files,
                         archive=paths["archive"], record={"name": name, "r": 8})


class FailingStorage(FilesystemStorage):
    """A filesystem backend whose n-th streamed blob write (to `tmp/`) fails half way
    (fault injection)."""

    def __init__(self, root: Path, fail_on_write: int) -> None:
        super().__init__(root)
        self.writes = 0
        self.fail_on_write = fail_on_write

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        if not key.startswith("tmp/"):
            return super().put_stream(key, chunks)
        self.writes += 1
        if self.writes != self.fail_on_write:
            return super().put_stream(key, chunks)

        def broken() -> Iterable[bytes]:
            yield from list(chunks)[:1]
            raise StorageError("disk went away", code="storage_error")

        return super().put_stream(key, broken())


@pytest.fixture
def fs(tmp_path: Path) -> FilesystemStorage:
    return FilesystemStorage(tmp_path / "store")


@pytest.fixture
def store(fs: FilesystemStorage) -> AdapterStore:
    return AdapterStore(fs)


@pytest.fixture
def adapter(tmp_path: Path) -> dict[str, Path]:
    return make_adapter(tmp_path / "adapter", seed=1)


def test_publish_then_get_list_fetch(store: AdapterStore, adapter: dict[str, Path],
                                     tmp_path: Path) -> None:
    manifest = publish(store, adapter)
    assert store.get_manifest("t1", "ad1") == manifest
    assert [m["id"] for m in store.list_manifests("t1")] == ["ad1"]
    assert manifest["record"] == {"name": "first", "r": 8}
    for name in FILE_NAMES:
        data = adapter[name].read_bytes()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(),
                                           "size": len(data)}
    out = store.fetch_files("t1", "ad1", tmp_path / "fetched")
    assert sorted(p.name for p in out.iterdir()) == sorted(FILE_NAMES)
    for name in FILE_NAMES:
        assert (out / name).read_bytes() == adapter[name].read_bytes()
    assert b"".join(store.open_archive("t1", "ad1")) == adapter["archive"].read_bytes()
    assert manifest["archive"]["format"] == "zip"
    assert store.archive_url("t1", "ad1") is None  # filesystem: the API streams instead
    again, digests = store.fetch_verified("t1", "ad1", tmp_path / "verified")
    assert digests == {name: hashlib.sha256((again / name).read_bytes()).hexdigest()
                       for name in FILE_NAMES}    # what the download checked, file by file


def test_layout_blobs_and_manifest(store: AdapterStore, fs: FilesystemStorage,
                                   adapter: dict[str, Path]) -> None:
    publish(store, adapter)
    keys = list(fs.list_keys(""))
    assert "tenants/t1/adapters/ad1.json" in keys
    blobs = [k for k in keys if k.startswith("blobs/sha256/")]
    assert len(blobs) == 4  # three files + archive
    for key in blobs:
        assert hashlib.sha256(fs.get_bytes(key)).hexdigest() == key.rsplit("/", 1)[1]
    assert not [k for k in keys if k.startswith("tmp/")]


def test_list_is_newest_first(store: AdapterStore, tmp_path: Path) -> None:
    for i in range(3):
        publish(store, make_adapter(tmp_path / f"a{i}", seed=i), adapter_id=f"ad{i}")
    assert [m["id"] for m in store.list_manifests("t1")] == ["ad2", "ad1", "ad0"]


def test_republish_overwrites_never_duplicates(store: AdapterStore, adapter: dict[str, Path],
                                               tmp_path: Path) -> None:
    publish(store, adapter, name="first")
    publish(store, make_adapter(tmp_path / "retry", seed=2), name="retried")
    listed = store.list_manifests("t1")
    assert [m["id"] for m in listed] == ["ad1"]
    assert listed[0]["record"]["name"] == "retried"


@pytest.mark.parametrize("fail_on_write", [1, 2, 4])  # first file, second file, archive
def test_failed_blob_upload_publishes_nothing(tmp_path: Path, adapter: dict[str, Path],
                                              fail_on_write: int) -> None:
    fs = FailingStorage(tmp_path / "store", fail_on_write=fail_on_write)
    store = AdapterStore(fs)
    with pytest.raises(StorageError, match="disk went away"):
        publish(store, adapter)
    assert store.list_manifests("t1") == []
    with pytest.raises(AdapterNotFound):
        store.get_manifest("t1", "ad1")
    assert [k for k in fs.list_keys("") if k != "meta/references-v1"] == []  # not even blobs


def test_failed_republish_keeps_previous_manifest(tmp_path: Path,
                                                  adapter: dict[str, Path]) -> None:
    fs = FailingStorage(tmp_path / "store", fail_on_write=7)  # 2nd publish, 3rd file
    store = AdapterStore(fs)
    before = publish(store, adapter, name="v1")
    with pytest.raises(StorageError):
        publish(store, make_adapter(tmp_path / "v2", seed=2), name="v2")
    assert store.list_manifests("t1") == [before]


def test_other_tenant_cannot_see_or_touch(store: AdapterStore, adapter: dict[str, Path],
                                          tmp_path: Path) -> None:
    publish(store, adapter, tenant="t1")
    assert store.list_manifests("t2") == []
    for action in (lambda: store.get_manifest("t2", "ad1"),
                   lambda: store.delete("t2", "ad1"),
                   lambda: store.fetch_files("t2", "ad1", tmp_path / "x"),
                   lambda: store.open_archive("t2", "ad1"),
                   lambda: store.archive_url("t2", "ad1")):
        with pytest.raises(AdapterNotFound) as info:
            action()
        assert info.value.code == "adapter_not_found"
    assert store.get_manifest("t1", "ad1")["tenant"] == "t1"


def test_manifest_claiming_another_tenant_is_not_found(store: AdapterStore,
                                                       fs: FilesystemStorage,
                                                       adapter: dict[str, Path]) -> None:
    publish(store, adapter, tenant="t1")
    fs.copy("tenants/t1/adapters/ad1.json", "tenants/t2/adapters/ad1.json")
    with pytest.raises(AdapterNotFound):
        store.get_manifest("t2", "ad1")


def test_identical_blobs_are_stored_once(store: AdapterStore, fs: FilesystemStorage,
                                         tmp_path: Path) -> None:
    shared = b"same weights" * 10_000
    publish(store, make_adapter(tmp_path / "a", seed=1, weights=shared), adapter_id="a")
    publish(store, make_adapter(tmp_path / "b", seed=2, weights=shared), adapter_id="b")
    a, b = store.get_manifest("t1", "a"), store.get_manifest("t1", "b")
    weights = "adapter_model.safetensors"
    assert a["files"][weights] == b["files"][weights]
    blobs = list(fs.list_keys("blobs/sha256/"))
    assert blobs.count("blobs/sha256/" + hashlib.sha256(shared).hexdigest()) == 1
    # config and weights are shared; lorafold.json and the archive differ per adapter
    assert len(blobs) == 2 + 2 * 2


def test_put_blob_stream_hash_and_dedup(store: AdapterStore, fs: FilesystemStorage) -> None:
    data = bytes(range(256)) * 1000
    ref = store.blobs.put_stream(data[i:i + 4096] for i in range(0, len(data), 4096))
    assert (ref.sha256, ref.size) == (hashlib.sha256(data).hexdigest(), len(data))
    again = store.blobs.put_stream([data])
    assert again == ref
    assert list(fs.list_keys("")) == [f"blobs/sha256/{ref.sha256}"]


def test_fetch_detects_corrupted_blob(store: AdapterStore, fs: FilesystemStorage,
                                      adapter: dict[str, Path], tmp_path: Path) -> None:
    manifest = publish(store, adapter)
    sha = manifest["files"]["adapter_model.safetensors"]["sha256"]
    fs.put_bytes(f"blobs/sha256/{sha}", b"bit rot")
    dest = tmp_path / "fetched"
    with pytest.raises(StorageError) as info:
        store.fetch_files("t1", "ad1", dest)
    assert info.value.code == "blob_corrupt"
    assert not (dest / "adapter_model.safetensors").exists()
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no temp left


def test_missing_blob_is_a_storage_error(store: AdapterStore, fs: FilesystemStorage,
                                         adapter: dict[str, Path]) -> None:
    manifest = publish(store, adapter)
    fs.delete(f"blobs/sha256/{manifest['archive']['sha256']}")
    with pytest.raises(StorageError) as info:
        store.open_archive("t1", "ad1")
    assert info.value.code == "blob_missing"


def test_delete_removes_manifest_and_its_blobs(store: AdapterStore, fs: FilesystemStorage,
                                               adapter: dict[str, Path]) -> None:
    publish(store, adapter)
    assert len(list(fs.list_keys("blobs/"))) == 4
    store.delete("t1", "ad1")
    assert store.list_manifests("t1") == []
    with pytest.raises(AdapterNotFound):
        store.get_manifest("t1", "ad1")
    with pytest.raises(AdapterNotFound):
        store.delete("t1", "ad1")
    assert list(fs.list_keys("blobs/")) == []
    assert list(fs.list_keys("refs/")) == []


@pytest.mark.parametrize("bad_id", ["../t2/adapters/x", "a/b", "", ".hidden", "x" * 200])
def test_malformed_ids_are_not_found_on_read_and_refused_on_publish(
        store: AdapterStore, adapter: dict[str, Path], bad_id: str) -> None:
    with pytest.raises(AdapterNotFound):
        store.get_manifest("t1", bad_id)
    with pytest.raises(InvalidRequest):
        publish(store, adapter, adapter_id=bad_id)


def test_bad_publish_arguments_upload_nothing(store: AdapterStore, fs: FilesystemStorage,
                                              adapter: dict[str, Path]) -> None:
    files = {n: adapter[n] for n in FILE_NAMES}
    with pytest.raises(InvalidRequest):
        store.publish(tenant="t1", adapter_id="a", files=files,
                      archive=adapter["adapter_model.safetensors"], record={})  # no format
    with pytest.raises(InvalidRequest):
        store.publish(tenant="t1", adapter_id="a", files={"../escape": adapter["lorafold.json"]},
                      archive=adapter["archive"], record={})
    with pytest.raises(InvalidRequest):
        store.publish(tenant="t1", adapter_id="a", files=files, archive=adapter["archive"],
                      record={"not json": object()})
    assert list(fs.list_keys("")) == []


def test_corrupt_manifest_is_skipped_in_listing_but_fails_get(
        store: AdapterStore, fs: FilesystemStorage, adapter: dict[str, Path]) -> None:
    publish(store, adapter, adapter_id="good")
    fs.put_bytes("tenants/t1/adapters/bad.json", b"{not json")
    assert [m["id"] for m in store.list_manifests("t1")] == ["good"]
    with pytest.raises(StorageError) as info:
        store.get_manifest("t1", "bad")
    assert info.value.code == "corrupt_manifest"
