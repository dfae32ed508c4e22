"""Tenant-scoped JSON manifests, one per stored thing (adapters, data sets).

A manifest names the blobs its item is made of and is written last and atomically, so
an item is listed only once all of its bytes are stored. Reading checks that the manifest
belongs to the tenant asking: another tenant's id is simply not found.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from lorafold.errors import InvalidRequest, NotFound, StorageError
from lorafold.storage import layout
from lorafold.storage.base import Storage

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


class Manifests:
    """The manifests of one kind ("adapters" or "datasets"); `not_found` is the error
    class for a missing id (AdapterNotFound, DatasetNotFound)."""

    def __init__(self, storage: Storage, kind: str, not_found: type[NotFound],
                 required: frozenset[str] = frozenset()) -> None:
        self.storage = storage
        self.kind = kind
        self.not_found = not_found
        self.required = required
        self.noun = kind.removesuffix("s")

    def _missing(self, item_id: str) -> NotFound:
        return self.not_found(f"{self.noun} {item_id!r} not found", **{f"{self.noun}_id": item_id})

    def write(self, tenant: str, item_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Write (or overwrite) the manifest; `body` is stored with id, tenant and a time."""
        key = layout.manifest_key(tenant, item_id, self.kind)
        manifest = {"manifest_version": MANIFEST_VERSION, **body, "id": item_id,
                    "tenant": tenant,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds")}
        try:
            payload = json.dumps(manifest, sort_keys=True, indent=1).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"{self.noun} {item_id!r}: manifest is not JSON: {e}") from e
        self.storage.put_bytes(key, payload)
        return manifest

    def get(self, tenant: str, item_id: str) -> dict[str, Any]:
        """The manifest; `not_found` if missing or another tenant's."""
        if not layout.is_valid_name(item_id):
            raise self._missing(item_id)  # cannot exist: same answer as a missing one
        try:
            payload = self.storage.get_bytes(layout.manifest_key(tenant, item_id, self.kind))
        except NotFound as e:
            raise self._missing(item_id) from e
        manifest = self._parse(payload, item_id)
        if manifest.get("tenant") != tenant or manifest.get("id") != item_id:
            raise self._missing(item_id)
        return manifest

    def list(self, tenant: str) -> list[dict[str, Any]]:
        """All of a tenant's manifests of this kind, newest first."""
        manifests = []
        for key in self.storage.list_keys(layout.manifest_prefix(tenant, self.kind)):
            if not key.endswith(layout.MANIFEST_SUFFIX):
                continue
            try:
                manifests.append(self.get(tenant, layout.adapter_id_of(key)))
            except NotFound:
                continue  # deleted between listing and reading
            except StorageError as e:
                if e.code != "corrupt_manifest":
                    raise
                logger.error("skipping unreadable manifest %s: %s", key, e)
        manifests.sort(key=lambda m: (str(m.get("created_at", "")), m["id"]), reverse=True)
        return manifests

    def find(self, tenant: str, item_id: str) -> dict[str, Any] | None:
        """The manifest, or None if there is none."""
        try:
            return self.get(tenant, item_id)
        except NotFound:
            return None

    def delete(self, tenant: str, item_id: str) -> dict[str, Any]:
        """Delete the manifest (`not_found` if none) and return it, so that the caller can
        release the blobs it named."""
        manifest = self.get(tenant, item_id)
        self.storage.delete(layout.manifest_key(tenant, item_id, self.kind))
        logger.info("deleted %s %s of tenant %s", self.noun, item_id, tenant)
        return manifest

    def _parse(self, payload: bytes, item_id: str) -> dict[str, Any]:
        try:
            manifest = json.loads(payload)
        except ValueError as e:
            raise StorageError(f"manifest of {self.noun} {item_id!r} is not valid JSON: {e}",
                               code="corrupt_manifest") from e
        if not isinstance(manifest, dict) or not self.required <= manifest.keys():
            raise StorageError(f"manifest of {self.noun} {item_id!r} is malformed",
                               code="corrupt_manifest")
        return manifest
