"""Where the adapter store keeps things in object storage — the only place that knows.

    blobs/sha256/<hex>                          content-addressed bytes, shared by adapters
    tenants/<tenant>/adapters/<adapter_id>.json one manifest per adapter, written last
    tenants/<tenant>/datasets/<dataset_id>.json one manifest per data set, written last
    refs/sha256/<hex>/<kind>/<tenant>/<id>      one empty marker per manifest naming the blob
    meta/references-v1                          the markers of older manifests are written
    tmp/<uuid>                                  uploads in flight, before their hash is known
"""

from __future__ import annotations

import re
import time
import uuid

from lorafold.errors import InvalidRequest

BLOB_PREFIX = "blobs/sha256/"
TMP_PREFIX = "tmp/"
REF_PREFIX = "refs/sha256/"
TENANTS_PREFIX = "tenants/"
REFERENCES_MARKER = "meta/references-v1"
MANIFEST_SUFFIX = ".json"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def is_valid_name(value: str) -> bool:
    """Tenant ids, adapter ids and file names: one safe key segment, at most 128 chars."""
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def check_name(value: str, what: str) -> str:
    if not is_valid_name(value):
        raise InvalidRequest(f"invalid {what} {value!r}: use letters, digits, '_', '-', '.' "
                             "(at most 128, starting with a letter or digit)",
                             code=f"invalid_{what.replace(' ', '_')}")
    return value


def blob_key(sha256: str) -> str:
    if _SHA256_RE.fullmatch(sha256) is None:
        raise InvalidRequest(f"invalid sha256 {sha256!r}", code="invalid_sha256")
    return BLOB_PREFIX + sha256


KINDS = ("adapters", "datasets")


def manifest_prefix(tenant: str, kind: str = "adapters") -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown manifest kind {kind!r}")
    return f"tenants/{check_name(tenant, 'tenant')}/{kind}/"


def manifest_key(tenant: str, item_id: str, kind: str = "adapters") -> str:
    what = "adapter id" if kind == "adapters" else "dataset id"
    return manifest_prefix(tenant, kind) + check_name(item_id, what) + MANIFEST_SUFFIX


def adapter_id_of(key: str) -> str:
    """The id a manifest key names (inverse of `manifest_key`)."""
    return key.rsplit("/", 1)[-1].removesuffix(MANIFEST_SUFFIX)


def ref_prefix(sha256: str) -> str:
    """Where the markers of the manifests naming blob `sha256` live."""
    return REF_PREFIX + blob_key(sha256).removeprefix(BLOB_PREFIX) + "/"


def ref_key(sha256: str, kind: str, tenant: str, item_id: str) -> str:
    """The marker saying that manifest (kind, tenant, item_id) names blob `sha256`."""
    manifest_key(tenant, item_id, kind)  # the same checks on kind, tenant and id
    return f"{ref_prefix(sha256)}{kind}/{tenant}/{item_id}"


def owner_of_ref(key: str) -> tuple[str, str, str]:
    """(kind, tenant, item_id) of a marker key (inverse of `ref_key`)."""
    kind, tenant, item_id = key.rsplit("/", 3)[1:]
    return kind, tenant, item_id


def tmp_key() -> str:
    """A fresh `tmp/` key; it starts with the time in ms (hex), so a sweep can tell its age."""
    return f"{TMP_PREFIX}{int(time.time() * 1000):x}-{uuid.uuid4().hex}"
