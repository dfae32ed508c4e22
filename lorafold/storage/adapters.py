"""The adapter store: object storage is the source of truth for adapters.

An adapter is a manifest plus the blobs it names. Blobs are content-addressed (sha256
computed while streaming), so identical files are stored once. The manifest is written
last and atomically, so a crash mid-publish leaves at most unreferenced blobs or a
`tmp/` object, never a listed half-adapter; publishing the same id again (a retried job)
overwrites the manifest instead of duplicating the adapter.

Deleting an adapter deletes its manifest only: blobs may be shared by other adapters.
Reclaiming unreferenced blobs and stale `tmp/` objects is a garbage collector's job
(future work).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lorafold.errors import AdapterNotFound, InvalidRequest, NotFound, StorageError
from lorafold.storage import layout
from lorafold.storage.base import DEFAULT_CHUNK_SIZE, ByteStream, HashingCounter, Storage

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
ARCHIVE_FORMATS = {".zip": "zip", ".tar.gz": "tar.gz", ".tgz": "tar.gz", ".tar": "tar"}


@dataclass(frozen=True)
class BlobRef:
    """A stored blob: its sha256 (hex) names it; size lets readers check what they got."""

    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


class AdapterStore:
    """Publish, list, read and delete tenant-scoped adapters on any `Storage`."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    # -- blobs ---------------------------------------------------------------------------

    def put_blob_stream(self, chunks: Iterable[bytes]) -> BlobRef:
        """Store bytes under their sha256; an identical existing blob is reused."""
        tmp = layout.tmp_key()
        written = self.storage.put_stream(tmp, chunks)  # cleans up after itself on error
        try:
            key = layout.blob_key(written.sha256)
            if self.storage.exists(key):
                self.storage.delete(tmp)
            else:
                self.storage.move(tmp, key)
        except BaseException:
            with contextlib.suppress(StorageError):
                self.storage.delete(tmp)
            raise
        return BlobRef(sha256=written.sha256, size=written.size)

    def put_blob_file(self, path: Path) -> BlobRef:
        return self.put_blob_stream(_file_chunks(Path(path)))

    # -- adapters ------------------------------------------------------------------------

    def publish(self, *, tenant: str, adapter_id: str, files: Mapping[str, Path],
                archive: Path, record: Mapping[str, Any],
                archive_format: str | None = None) -> dict[str, Any]:
        """Upload the adapter's files and archive as blobs, then write its manifest."""
        key = layout.manifest_key(tenant, adapter_id)
        if not files:
            raise InvalidRequest(f"adapter {adapter_id!r} has no files to publish")
        for name in files:
            layout.check_name(name, "file name")
        fmt = archive_format or _archive_format(Path(archive))
        try:  # refuse a bad record before uploading anything
            json.dumps(dict(record))
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"adapter {adapter_id!r}: record is not JSON: {e}") from e
        refs = {name: self.put_blob_file(path).to_dict() for name, path in files.items()}
        archive_ref = self.put_blob_file(Path(archive))
        manifest: dict[str, Any] = {
            "manifest_version": MANIFEST_VERSION,
            "id": adapter_id,
            "tenant": tenant,
            "files": refs,
            "archive": {**archive_ref.to_dict(), "format": fmt},
            "record": dict(record),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        }
        payload = json.dumps(manifest, sort_keys=True, indent=1).encode("utf-8")
        self.storage.put_bytes(key, payload)  # last: only now is the adapter visible
        logger.info("published adapter %s for tenant %s (%d files)", adapter_id, tenant,
                    len(refs))
        return manifest

    def get_manifest(self, tenant: str, adapter_id: str) -> dict[str, Any]:
        """The adapter's manifest; AdapterNotFound if missing or another tenant's."""
        if not layout.is_valid_name(adapter_id):
            raise _not_found(adapter_id)  # cannot exist: same answer as a missing one
        try:
            payload = self.storage.get_bytes(layout.manifest_key(tenant, adapter_id))
        except NotFound as e:
            raise _not_found(adapter_id) from e
        manifest = _parse_manifest(payload, adapter_id)
        if manifest.get("tenant") != tenant or manifest.get("id") != adapter_id:
            raise _not_found(adapter_id)
        return manifest

    def list_manifests(self, tenant: str) -> list[dict[str, Any]]:
        """All of a tenant's adapters, newest first."""
        manifests = []
        for key in self.storage.list_keys(layout.manifest_prefix(tenant)):
            if not key.endswith(layout.MANIFEST_SUFFIX):
                continue
            adapter_id = layout.adapter_id_of(key)
            try:
                manifests.append(self.get_manifest(tenant, adapter_id))
            except AdapterNotFound:
                continue  # deleted between listing and reading
            except StorageError as e:
                if e.code != "corrupt_manifest":
                    raise
                logger.error("skipping unreadable manifest %s: %s", key, e)
        manifests.sort(key=lambda m: (str(m.get("created_at", "")), m["id"]), reverse=True)
        return manifests

    def delete(self, tenant: str, adapter_id: str) -> None:
        """Delete the manifest (AdapterNotFound if none); the blobs stay (may be shared)."""
        self.get_manifest(tenant, adapter_id)
        self.storage.delete(layout.manifest_key(tenant, adapter_id))
        logger.info("deleted adapter %s of tenant %s", adapter_id, tenant)

    def fetch_files(self, tenant: str, adapter_id: str, dest_dir: Path) -> Path:
        """Stream the adapter's files into `dest_dir`, checking size and sha256."""
        manifest = self.get_manifest(tenant, adapter_id)
        dest_dir = Path(dest_dir)
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create {dest_dir}: {e}") from e
        for name, ref in manifest["files"].items():
            layout.check_name(name, "file name")  # never trust a name to stay in dest_dir
            self._download_blob(ref, dest_dir / name)
        return dest_dir

    def open_archive(self, tenant: str, adapter_id: str) -> ByteStream:
        """The adapter's archive as a byte stream (opened now, read lazily)."""
        manifest = self.get_manifest(tenant, adapter_id)
        return self._open_blob(manifest["archive"])

    def archive_url(self, tenant: str, adapter_id: str, expires_s: int = 3600) -> str | None:
        """A presigned download URL for the archive, or None if the storage has none."""
        manifest = self.get_manifest(tenant, adapter_id)
        archive = manifest["archive"]
        return self.storage.presigned_url(layout.blob_key(archive["sha256"]), expires_s,
                                          filename=f"{adapter_id}.{archive['format']}")

    # -- helpers -------------------------------------------------------------------------

    def _open_blob(self, ref: Mapping[str, Any]) -> ByteStream:
        key = layout.blob_key(ref["sha256"])
        try:
            return self.storage.open_stream(key)
        except NotFound as e:
            # A manifest naming a missing blob is a broken store, not a user's 404.
            raise StorageError(f"blob {key} named by a manifest is missing",
                               code="blob_missing") from e

    def _download_blob(self, ref: Mapping[str, Any], dest: Path) -> None:
        counter = HashingCounter()
        with self._open_blob(ref) as stream:
            try:
                fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
            except OSError as e:
                raise StorageError(f"cannot write {dest}: {e}") from e
            try:
                with os.fdopen(fd, "wb") as f:
                    for chunk in stream:
                        counter.update(chunk)
                        f.write(chunk)
                got = counter.result()
                if (got.sha256, got.size) != (ref["sha256"], ref["size"]):
                    raise StorageError(f"blob {ref['sha256']} read back as {got.sha256} "
                                       f"({got.size} bytes, expected {ref['size']})",
                                       code="blob_corrupt")
                os.replace(tmp_name, dest)
            except OSError as e:
                raise StorageError(f"cannot write {dest}: {e}") from e
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)


def _not_found(adapter_id: str) -> AdapterNotFound:
    return AdapterNotFound(f"adapter {adapter_id!r} not found", adapter_id=adapter_id)


def _parse_manifest(payload: bytes, adapter_id: str) -> dict[str, Any]:
    try:
        manifest = json.loads(payload)
    except ValueError as e:
        raise StorageError(f"manifest of adapter {adapter_id!r} is not valid JSON: {e}",
                           code="corrupt_manifest") from e
    if not isinstance(manifest, dict) or not {"files", "archive"} <= manifest.keys():
        raise StorageError(f"manifest of adapter {adapter_id!r} is malformed",
                           code="corrupt_manifest")
    return manifest


def _archive_format(path: Path) -> str:
    name = path.name.lower()
    for suffix, fmt in ARCHIVE_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise InvalidRequest(f"cannot tell the archive format of {path.name!r} "
                         f"(expected one of {', '.join(ARCHIVE_FORMATS)})",
                         code="invalid_archive")


def _file_chunks(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk
    except OSError as e:
        raise StorageError(f"cannot read local file {path}: {e}") from e
