"""Reference-counted blobs on the filesystem backend: a blob shared by several manifests
(adapters, data sets, tenants) goes with the last of them, never before; older manifests
without markers are backfilled; a concurrent publish of the same bytes survives a delete;
the sweep collects what crashes leave."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from lorafold.storage import FilesystemStorage
from lorafold.storage.adapters import AdapterStore
from lorafold.storage.datasets import DatasetStore
from lorafold.storage.layout import blob_key, ref_key, tmp_key
from lorafold.storage.references import Owner
from tests.unit.storage.test_adapter_store import make_adapter, publish


def blob_keys(fs: FilesystemStorage) -> set[str]:
    return set(fs.list_keys("blobs/"))


def test_a_shared_blob_goes_with_the_last_adapter_naming_it(tmp_path: Path) -> None:
    fs = FilesystemStorage(tmp_path / "store")
    store = AdapterStore(fs)
    first = publish(store, make_adapter(tmp_path / "a", seed=1), adapter_id="ad1")
    # The same config and weights, another lorafold.json and archive: two shared blobs.
    second = publish(store, make_adapter(tmp_path / "b", seed=2,
                                         weights=(tmp_path / "a" / "adapter_model."
                                                  "safetensors").read_bytes()),
                     adapter_id="ad2")
    shared = first["files"]["adapter_model.safetensors"]["sha256"]
    assert second["files"]["adapter_model.safetensors"]["sha256"] == shared
    assert second["files"]["adapter_config.json"] == first["files"]["adapter_config.json"]
    assert len(blob_keys(fs)) == 6

    deleted = store.delete("t1", "ad1")
    assert shared not in deleted and len(deleted) == 2  # its lorafold.json and archive
    assert blob_key(shared) in blob_keys(fs)
    out = store.fetch_files("t1", "ad2", tmp_path / "fetched")  # still whole
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "a" / "adapter_model.safetensors").read_bytes()

    assert shared in store.delete("t1", "ad2")
    assert blob_keys(fs) == set() and list(fs.list_keys("refs/")) == []


def test_tenants_and_data_sets_share_blobs_safely(tmp_path: Path) -> None:
    fs = FilesystemStorage(tmp_path / "store")
    adapters, datasets = AdapterStore(fs), DatasetStore(fs)
    paths = make_adapter(tmp_path / "a", seed=1)
    publish(adapters, paths, tenant="t1")
    publish(adapters, paths, tenant="t2")  # another tenant, the very same bytes
    adapters.delete("t1", "ad1")
    assert adapters.fetch_files("t2", "ad1", tmp_path / "t2")
    # A data set whose file happens to be byte-identical to an adapter's file.
    datasets.publish(tenant="t1", dataset_id="ds_1", path=paths["lorafold.json"],
                     record={"name": "d"})
    adapters.delete("t2", "ad1")
    digests = {k.rsplit("/", 1)[1] for k in blob_keys(fs)}
    assert len(digests) == 1
    assert datasets.fetch("t1", "ds_1", tmp_path / "d.jsonl").read_bytes() == \
        paths["lorafold.json"].read_bytes()
    datasets.delete("t1", "ds_1")
    assert blob_keys(fs) == set()


def test_manifests_older_than_markers_keep_their_blobs(tmp_path: Path) -> None:
    fs = FilesystemStorage(tmp_path / "store")
    store = AdapterStore(fs)
    paths = make_adapter(tmp_path / "a", seed=1)
    publish(store, paths, adapter_id="old")
    for key in list(fs.list_keys("refs/")) + list(fs.list_keys("meta/")):
        fs.delete(key)  # as a store written before reference markers existed
    publish(store, paths, adapter_id="new")
    store.delete("t1", "new")  # backfills "old"'s markers before releasing anything
    assert len(blob_keys(fs)) == 4
    assert store.fetch_files("t1", "old", tmp_path / "old")
    store.delete("t1", "old")
    assert blob_keys(fs) == set()


class RacingStorage(FilesystemStorage):
    """Starts a publish of the same bytes at the worst moment: when a release, having found
    no marker left, is about to delete the blob."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.before_blob_delete: threading.Thread | None = None

    def delete(self, key: str) -> None:
        racer = self.before_blob_delete
        if racer is not None and key.startswith("blobs/"):
            self.before_blob_delete = None
            racer.start()
            time.sleep(0.5)  # give it every chance to slip in
        super().delete(key)


def test_a_concurrent_publish_of_the_same_bytes_survives_a_delete(tmp_path: Path) -> None:
    fs = RacingStorage(tmp_path / "store")
    store = AdapterStore(fs)
    paths = make_adapter(tmp_path / "a", seed=1)
    publish(store, paths, adapter_id="ad1")
    errors: list[BaseException] = []

    def publish_again() -> None:
        try:
            publish(store, paths, adapter_id="ad2")
        except BaseException as e:  # reported below
            errors.append(e)

    racer = threading.Thread(target=publish_again)
    store.blobs.references.ensure_backfilled()
    fs.before_blob_delete = racer
    store.delete("t1", "ad1")
    racer.join(30)
    assert not errors
    out = store.fetch_files("t1", "ad2", tmp_path / "fetched")
    for name in ("adapter_config.json", "adapter_model.safetensors", "lorafold.json"):
        assert (out / name).read_bytes() == paths[name].read_bytes()
    assert b"".join(store.open_archive("t1", "ad2")) == paths["archive"].read_bytes()


def test_a_republish_releases_what_the_new_manifest_no_longer_names(tmp_path: Path) -> None:
    fs = FilesystemStorage(tmp_path / "store")
    store = AdapterStore(fs)
    publish(store, make_adapter(tmp_path / "v1", seed=1), name="v1")
    second = publish(store, make_adapter(tmp_path / "v2", seed=2), name="v2")  # a retried job
    named = {blob_key(ref["sha256"]) for ref in [*second["files"].values(), second["archive"]]}
    assert blob_keys(fs) == named and len(named) == 4


def test_the_sweep_collects_what_crashes_leave(tmp_path: Path) -> None:
    fs = FilesystemStorage(tmp_path / "store")
    store = AdapterStore(fs)
    publish(store, make_adapter(tmp_path / "a", seed=1))
    kept = blob_keys(fs)
    orphan = fs.put_bytes("tmp/x", b"orphan")
    fs.move("tmp/x", blob_key(orphan.sha256))          # a blob no marker names
    old_tmp = "tmp/" + f"{int((time.time() - 90_000) * 1000):x}-abc"
    fs.put_bytes(old_tmp, b"half an upload")
    young_tmp = tmp_key()
    fs.put_bytes(young_tmp, b"an upload in flight")
    ghost = Owner("adapters", "t1", "gone")             # a publish that died before its
    digest = next(iter(kept)).rsplit("/", 1)[1]         # manifest was written
    fs.put_bytes(ref_key(digest, "adapters", "t1", "gone"),
                 json.dumps({"at": time.time() - 90_000}).encode())
    young = ref_key(digest, "adapters", "t1", "publishing")
    fs.put_bytes(young, json.dumps({"at": time.time()}).encode())

    report = store.blobs.references.sweep()
    assert report.blobs_deleted == [orphan.sha256]
    assert report.markers_deleted == 1 and report.tmp_deleted == 1
    assert blob_keys(fs) == kept
    assert set(fs.list_keys("tmp/")) == {young_tmp}
    assert ghost not in store.blobs.references.referrers(digest)
    assert fs.exists(young)
