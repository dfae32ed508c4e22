"""The data set store: validated JSONL files kept as blobs, one manifest per data set.

A data set is stored only after every line was validated (see `lorafold.unlearn.datasets`),
so a job never meets a malformed file; its manifest carries a `record` (name, counts,
fingerprint) that the API shows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorafold.errors import DatasetNotFound, StorageError
from lorafold.storage.base import Storage
from lorafold.storage.blobs import BlobStore
from lorafold.storage.manifests import Manifests

logger = logging.getLogger(__name__)


class DatasetStore:
    """Publish, list, read and delete tenant-scoped JSONL data sets on any `Storage`."""

    def __init__(self, storage: Storage) -> None:
        self.blobs = BlobStore(storage)
        self.manifests = Manifests(storage, "datasets", DatasetNotFound,
                                   required=frozenset({"file", "record"}))

    def publish(self, *, tenant: str, dataset_id: str, path: Path,
                record: Mapping[str, Any]) -> dict[str, Any]:
        """Store the file as a blob, then the manifest (last: only then is it listed)."""
        ref = self.blobs.put_file(path)
        manifest = self.manifests.write(tenant, dataset_id,
                                        {"file": ref.to_dict(), "record": dict(record)})
        logger.info("published dataset %s for tenant %s (%d bytes)", dataset_id, tenant,
                    ref.size)
        return manifest

    def get_manifest(self, tenant: str, dataset_id: str) -> dict[str, Any]:
        return self.manifests.get(tenant, dataset_id)

    def list_manifests(self, tenant: str) -> list[dict[str, Any]]:
        return self.manifests.list(tenant)

    def delete(self, tenant: str, dataset_id: str) -> None:
        self.manifests.delete(tenant, dataset_id)

    def fetch(self, tenant: str, dataset_id: str, dest: Path) -> Path:
        """Download the data set's JSONL to `dest`, checking its size and sha256."""
        manifest = self.get_manifest(tenant, dataset_id)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create {dest.parent}: {e}") from e
        self.blobs.download(manifest["file"], dest)
        return dest
