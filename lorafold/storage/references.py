"""Reference-counted blobs: a blob is deleted when no manifest names it any more.

Blobs are content-addressed, so one blob may belong to several adapters and data sets, of
several tenants. Each manifest that names a blob has a marker object beside it,
`refs/sha256/<hex>/<kind>/<tenant>/<id>` (see `layout`): the reference set lives in the
store that is the source of truth, so it never disagrees with Redis after a restore, and
`list_keys` of one prefix answers "who still uses this blob?".

Race-freedom comes from one lock per digest (`locks.Locks`):
- publishing streams the bytes to `tmp/` without the lock, then, holding it, writes its
  marker and only then checks whether the blob exists (reuse) or moves it into place;
- releasing (a manifest was deleted or replaced), holding it, removes the marker and
  deletes the blob only if no marker is left.
So an upload of the same bytes either wrote its marker first (the blob stays) or runs after
the blob was deleted (and stores it again). Why markers and a lock rather than a
mark-and-sweep with a grace period: a sweep must list every manifest of every tenant to
free anything, and its grace period is a guess; markers free a blob at once, at the cost
of one small object per (blob, manifest).

Manifests written before markers existed get theirs once (`ensure_backfilled`, run before
the first release), so no older adapter loses a shared blob. `sweep` is the backstop for
crashes between the steps above: blobs with no marker, markers older than a grace period
whose manifest is gone, and stale `tmp/` objects.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lorafold.errors import NotFound, StorageError
from lorafold.storage import layout
from lorafold.storage.base import PutResult, Storage
from lorafold.storage.locks import LocalLocks, Locks

logger = logging.getLogger(__name__)

BACKFILL_LOCK = "references-backfill"
SWEEP_GRACE_S = 24 * 3600  # a publish in flight never takes this long
_MANIFEST_BLOB_FIELDS = ("archive", "file")


@dataclass(frozen=True)
class Owner:
    """A manifest that may name blobs: (kind, tenant, item id)."""

    kind: str
    tenant: str
    item_id: str


def manifest_digests(manifest: Mapping[str, Any]) -> set[str]:
    """The sha256 of every blob a manifest names (its files, archive, data set file)."""
    refs: list[Any] = list(dict(manifest.get("files") or {}).values())
    refs += [manifest.get(name) for name in _MANIFEST_BLOB_FIELDS]
    return {str(ref["sha256"]) for ref in refs if isinstance(ref, Mapping) and "sha256" in ref}


@dataclass
class SweepReport:
    blobs_deleted: list[str] = field(default_factory=list)
    markers_deleted: int = 0
    tmp_deleted: int = 0


class BlobReferences:
    """The reference markers of every blob on one `Storage`, under per-digest locks."""

    def __init__(self, storage: Storage, locks: Locks | None = None) -> None:
        self.storage = storage
        self.locks: Locks = locks if locks is not None else LocalLocks()

    def _marker(self, digest: str, owner: Owner) -> str:
        return layout.ref_key(digest, owner.kind, owner.tenant, owner.item_id)

    def _write_marker(self, digest: str, owner: Owner) -> None:
        body = json.dumps({"at": time.time()}).encode()
        self.storage.put_bytes(self._marker(digest, owner), body)

    def place(self, tmp: str, written: PutResult, owner: Owner | None) -> None:
        """Make the streamed `tmp` object blob `written.sha256`, referenced by `owner`."""
        key = layout.blob_key(written.sha256)
        with self.locks.hold([written.sha256]):
            if owner is not None:
                self._write_marker(written.sha256, owner)
            if self.storage.exists(key):
                self.storage.delete(tmp)
            else:
                self.storage.move(tmp, key)

    def referrers(self, digest: str) -> list[Owner]:
        return [Owner(*layout.owner_of_ref(key))
                for key in self.storage.list_keys(layout.ref_prefix(digest))]

    def release(self, owner: Owner, digests: Iterable[str]) -> list[str]:
        """Drop `owner`'s references; delete (and return) the blobs nobody names now."""
        self.ensure_backfilled()
        deleted = []
        for digest in sorted(set(digests)):
            with self.locks.hold([digest]):
                self.storage.delete(self._marker(digest, owner))
                if next(iter(self.storage.list_keys(layout.ref_prefix(digest))), None) is None:
                    self.storage.delete(layout.blob_key(digest))
                    deleted.append(digest)
        if deleted:
            logger.info("deleted %d blob(s) no manifest names after %s %s of tenant %s "
                        "went", len(deleted), owner.kind, owner.item_id, owner.tenant)
        return deleted

    def release_quietly(self, owner: Owner, digests: Iterable[str]) -> None:
        """`release` on the way out of a failed publish: its error is the one to report."""
        try:
            self.release(owner, digests)
        except StorageError:
            logger.warning("could not release the blobs of failed publish of %s %s",
                           owner.kind, owner.item_id, exc_info=True)

    def ensure_backfilled(self) -> None:
        """Write the markers of manifests stored before markers existed (once per store)."""
        if self.storage.exists(layout.REFERENCES_MARKER):
            return
        with self.locks.hold([BACKFILL_LOCK]):
            if self.storage.exists(layout.REFERENCES_MARKER):
                return
            count = 0
            for key, manifest in self._manifests():
                owner = Owner(key.split("/")[2], str(manifest["tenant"]), str(manifest["id"]))
                for digest in manifest_digests(manifest):
                    with self.locks.hold([digest]):
                        if not self.storage.exists(self._marker(digest, owner)):
                            self._write_marker(digest, owner)
                            count += 1
            self.storage.put_bytes(layout.REFERENCES_MARKER, b"{}")
            logger.info("wrote %d blob reference marker(s) for older manifests", count)

    def _manifests(self) -> Iterable[tuple[str, dict[str, Any]]]:
        for key in self.storage.list_keys(layout.TENANTS_PREFIX):
            parts = key.split("/")
            if len(parts) != 4 or parts[2] not in layout.KINDS \
                    or not key.endswith(layout.MANIFEST_SUFFIX):
                continue
            try:
                manifest = json.loads(self.storage.get_bytes(key))
            except (NotFound, ValueError):
                continue  # deleted meanwhile, or corrupt (listing skips those too)
            if isinstance(manifest, dict) and "tenant" in manifest and "id" in manifest:
                yield key, manifest

    def sweep(self, *, grace_s: float = SWEEP_GRACE_S, now: float | None = None) -> SweepReport:
        """Collect what crashes left: markers older than `grace_s` whose manifest is gone,
        blobs no marker names, `tmp/` objects of publishes that never finished. Cost:
        one listing of the blobs, markers and tmp objects."""
        self.ensure_backfilled()
        now = time.time() if now is None else now
        report = SweepReport()
        for key in list(self.storage.list_keys(layout.REF_PREFIX)):
            kind, tenant, item_id = layout.owner_of_ref(key)
            if self.storage.exists(layout.manifest_key(tenant, item_id, kind)):
                continue
            if now - _marker_time(self.storage, key) >= grace_s:
                self.storage.delete(key)
                report.markers_deleted += 1
        for key in list(self.storage.list_keys(layout.BLOB_PREFIX)):
            digest = key.removeprefix(layout.BLOB_PREFIX)
            with self.locks.hold([digest]):
                if next(iter(self.storage.list_keys(layout.ref_prefix(digest))), None) is None:
                    self.storage.delete(key)
                    report.blobs_deleted.append(digest)
        for key in list(self.storage.list_keys(layout.TMP_PREFIX)):
            if now - _tmp_time(key) >= grace_s:
                self.storage.delete(key)
                report.tmp_deleted += 1
        logger.info("storage sweep: %d blob(s), %d marker(s), %d tmp object(s) deleted",
                    len(report.blobs_deleted), report.markers_deleted, report.tmp_deleted)
        return report


def _marker_time(storage: Storage, key: str) -> float:
    try:
        return float(json.loads(storage.get_bytes(key))["at"])
    except (NotFound, StorageError, ValueError, KeyError, TypeError):
        return 0.0  # unreadable: as old as can be


def _tmp_time(key: str) -> float:
    """When a `tmp/` object was started (its name carries the time, see `layout.tmp_key`)."""
    stamp = key.removeprefix(layout.TMP_PREFIX).partition("-")[0]
    return int(stamp, 16) / 1000 if stamp.isalnum() and "-" in key else 0.0
