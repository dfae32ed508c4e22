"""The adapter store: object storage is the source of truth for adapters.

An adapter is a manifest plus the blobs it names. Blobs are content-addressed (sha256
computed while streaming), so identical files are stored once. The manifest is written
last and atomically, so a crash mid-publish leaves at most unreferenced blobs or a
`tmp/` object, never a listed half-adapter; publishing the same id again (a retried job)
overwrites the manifest instead of duplicating the adapter.

Deleting an adapter deletes its manifest, then every blob it named that no other
manifest (of any tenant) names any more (`references`); a republish releases the blobs
the old manifest named and the new one does not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorafold.errors import AdapterNotFound, InvalidRequest, StorageError
from lorafold.storage import layout
from lorafold.storage.base import ByteStream, Storage
from lorafold.storage.blobs import BlobStore
from lorafold.storage.locks import Locks
from lorafold.storage.manifests import Manifests
from lorafold.storage.references import Owner, manifest_digests

logger = logging.getLogger(__name__)

ARCHIVE_FORMATS = {".zip": "zip", ".tar.gz": "tar.gz", ".tgz": "tar.gz", ".tar": "tar"}


class AdapterStore:
    """Publish, list, read and delete tenant-scoped adapters on any `Storage`."""

    def __init__(self, storage: Storage, locks: Locks | None = None) -> None:
        self.storage = storage
        self.blobs = BlobStore(storage, locks)
        self.manifests = Manifests(storage, "adapters", AdapterNotFound,
                                   required=frozenset({"files", "archive"}))

    # -- adapters ------------------------------------------------------------------------

    def publish(self, *, tenant: str, adapter_id: str, files: Mapping[str, Path],
                archive: Path, record: Mapping[str, Any],
                archive_format: str | None = None) -> dict[str, Any]:
        """Upload the adapter's files and archive as blobs, then write its manifest."""
        layout.manifest_key(tenant, adapter_id)  # refuse bad ids before uploading anything
        if not files:
            raise InvalidRequest(f"adapter {adapter_id!r} has no files to publish")
        for name in files:
            layout.check_name(name, "file name")
        fmt = archive_format or _archive_format(Path(archive))
        try:  # refuse a bad record before uploading anything
            json.dumps(dict(record))
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"adapter {adapter_id!r}: record is not JSON: {e}") from e
        owner = Owner("adapters", tenant, adapter_id)
        previous = self.manifests.find(tenant, adapter_id)  # a retried job republishes
        kept = manifest_digests(previous) if previous is not None else set()
        placed: set[str] = set()
        try:
            refs = {}
            for name, path in files.items():
                refs[name] = self.blobs.put_file(path, owner).to_dict()
                placed.add(refs[name]["sha256"])
            archive_ref = self.blobs.put_file(Path(archive), owner)
            placed.add(archive_ref.sha256)
            manifest = self.manifests.write(tenant, adapter_id, {  # last: now it is visible
                "files": refs, "archive": {**archive_ref.to_dict(), "format": fmt},
                "record": dict(record)})
        except BaseException:
            self.blobs.references.release_quietly(owner, placed - kept)
            raise
        self.blobs.references.release(owner, kept - manifest_digests(manifest))
        logger.info("published adapter %s for tenant %s (%d files)", adapter_id, tenant,
                    len(refs))
        return manifest

    def get_manifest(self, tenant: str, adapter_id: str) -> dict[str, Any]:
        """The adapter's manifest; AdapterNotFound if missing or another tenant's."""
        return self.manifests.get(tenant, adapter_id)

    def list_manifests(self, tenant: str) -> list[dict[str, Any]]:
        """All of a tenant's adapters, newest first."""
        return self.manifests.list(tenant)

    def delete(self, tenant: str, adapter_id: str) -> list[str]:
        """Delete the manifest (AdapterNotFound if none), then the blobs nobody else names;
        returns their digests."""
        manifest = self.manifests.delete(tenant, adapter_id)
        return self.blobs.references.release(Owner("adapters", tenant, adapter_id),
                                             manifest_digests(manifest))

    def stored_bytes(self, tenant: str) -> int:
        """What the tenant's adapters take (files and archive; a shared blob counts for
        each adapter naming it: what the tenant would store alone)."""
        return sum(_manifest_bytes(m) for m in self.list_manifests(tenant))

    def fetch_files(self, tenant: str, adapter_id: str, dest_dir: Path) -> Path:
        """Stream the adapter's files into `dest_dir`, checking size and sha256."""
        return self.fetch_verified(tenant, adapter_id, dest_dir)[0]

    def fetch_verified(self, tenant: str, adapter_id: str,
                       dest_dir: Path) -> tuple[Path, dict[str, str]]:
        """`fetch_files`, plus each file's sha256 as checked while it downloaded, so that
        readers need not hash the files again."""
        manifest = self.get_manifest(tenant, adapter_id)
        dest_dir = Path(dest_dir)
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create {dest_dir}: {e}") from e
        for name, ref in manifest["files"].items():
            layout.check_name(name, "file name")  # never trust a name to stay in dest_dir
            self.blobs.download(ref, dest_dir / name)
        return dest_dir, {name: str(ref["sha256"]) for name, ref in manifest["files"].items()}

    def open_archive(self, tenant: str, adapter_id: str) -> ByteStream:
        """The adapter's archive as a byte stream (opened now, read lazily)."""
        manifest = self.get_manifest(tenant, adapter_id)
        return self.blobs.open(manifest["archive"])

    def archive_url(self, tenant: str, adapter_id: str, expires_s: int = 3600) -> str | None:
        """A presigned download URL for the archive, or None if the storage has none."""
        manifest = self.get_manifest(tenant, adapter_id)
        archive = manifest["archive"]
        return self.storage.presigned_url(layout.blob_key(archive["sha256"]), expires_s,
                                          filename=f"{adapter_id}.{archive['format']}")


def _manifest_bytes(manifest: Mapping[str, Any]) -> int:
    refs = [*dict(manifest.get("files") or {}).values(), manifest.get("archive"),
            manifest.get("file")]
    return sum(int(ref.get("size", 0)) for ref in refs if isinstance(ref, Mapping))


def _archive_format(path: Path) -> str:
    name = path.name.lower()
    for suffix, fmt in ARCHIVE_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise InvalidRequest(f"cannot tell the archive format of {path.name!r} "
                         f"(expected one of {', '.join(ARCHIVE_FORMATS)})",
                         code="invalid_archive")
