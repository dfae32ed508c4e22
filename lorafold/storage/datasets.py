"""The data set store: validated JSONL files kept as blobs, one manifest per data set.

A data set is stored only after every line was validated (see `lorafold.unlearn.datasets`),
so a job never meets a malformed file; its manifest carries a `record` (name, counts,
fingerprint) that the API shows. Deleting one is a hard delete: the manifest, then its
file's blob unless another manifest names the same bytes (`references`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorafold.errors import DatasetNotFound, StorageError
from lorafold.storage.base import Storage
from lorafold.storage.blobs import BlobStore
from lorafold.storage.locks import Locks
from lorafold.storage.manifests import Manifests
from lorafold.storage.references import Owner, manifest_digests

logger = logging.getLogger(__name__)


class DatasetStore:
    """Publish, list, read and delete tenant-scoped JSONL data sets on any `Storage`."""

    def __init__(self, storage: Storage, locks: Locks | None = None) -> None:
        self.blobs = BlobStore(storage, locks)
        self.manifests = Manifests(storage, "datasets", DatasetNotFound,
                                   required=frozenset({"file", "record"}))

    def publish(self, *, tenant: str, dataset_id: str, path: Path,
                record: Mapping[str, Any]) -> dict[str, Any]:
        """Store the file as a blob, then the manifest (last: only then is it listed)."""
        owner = Owner("datasets", tenant, dataset_id)
        ref = self.blobs.put_file(path, owner)
        try:
            manifest = self.manifests.write(tenant, dataset_id,
                                            {"file": ref.to_dict(), "record": dict(record)})
        except BaseException:
            self.blobs.references.release_quietly(owner, [ref.sha256])
            raise
        logger.info("published dataset %s for tenant %s (%d bytes)", dataset_id, tenant,
                    ref.size)
        return manifest

    def get_manifest(self, tenant: str, dataset_id: str) -> dict[str, Any]:
        return self.manifests.get(tenant, dataset_id)

    def list_manifests(self, tenant: str) -> list[dict[str, Any]]:
        return self.manifests.list(tenant)

    def delete(self, tenant: str, dataset_id: str) -> list[str]:
        """Delete the manifest (DatasetNotFound if none), then its blob unless another
        manifest names it; returns the digests deleted."""
        manifest = self.manifests.delete(tenant, dataset_id)
        return self.blobs.references.release(Owner("datasets", tenant, dataset_id),
                                             manifest_digests(manifest))

    def stored_bytes(self, tenant: str) -> int:
        return sum(int(m["file"].get("size", 0)) for m in self.list_manifests(tenant))

    def fetch(self, tenant: str, dataset_id: str, dest: Path) -> Path:
        """Download the data set's JSONL to `dest`, checking its size and sha256."""
        manifest = self.get_manifest(tenant, dataset_id)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create {dest.parent}: {e}") from e
        self.blobs.download(manifest["file"], dest)
        return dest
