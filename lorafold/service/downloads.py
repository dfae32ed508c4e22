"""Downloads in the archive format a serving platform wants: `tar` (the stored archive,
or a redirect to it), `tar.gz` or `zip` (built from the stored files while they stream).

Every format has the adapter's stored files at its root (adapter_config.json,
adapter_model.safetensors, and lorafold.json for outputs of lorafold). The compressed
formats cannot be presigned, as no such object exists: they always stream through the
API, one blob chunk at a time (lorafold.adapters.archive_stream), and each file's sha256
is checked as it passes, so a corrupt blob aborts the download instead of completing it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any, Literal, get_args

from lorafold.adapters.archive_stream import Member, StreamFormat, stream_archive
from lorafold.errors import InvalidRequest, StorageError
from lorafold.service.adapters import Download, open_download
from lorafold.storage import Storage, layout
from lorafold.storage.adapters import AdapterStore
from lorafold.storage.base import HashingCounter
from lorafold.storage.blobs import BlobStore

logger = logging.getLogger(__name__)

DownloadFormat = Literal["tar", "tar.gz", "zip"]
DOWNLOAD_FORMATS: tuple[str, ...] = get_args(DownloadFormat)
MEDIA_TYPES: Mapping[str, str] = {"tar": "application/x-tar", "tar.gz": "application/gzip",
                                  "zip": "application/zip"}


def check_format(fmt: str) -> DownloadFormat:
    if fmt not in DOWNLOAD_FORMATS:
        raise InvalidRequest(f"download format {fmt!r} is not one of "
                             f"{', '.join(DOWNLOAD_FORMATS)}", code="unsupported_format")
    return fmt  # type: ignore[return-value]


def _verified_chunks(blobs: BlobStore, name: str, ref: Mapping[str, Any]) -> Iterator[bytes]:
    """The blob's bytes, opened when first iterated, checked against its sha256 at the end."""
    counter = HashingCounter()
    with blobs.open(ref) as stream:
        for chunk in stream:
            counter.update(chunk)
            yield chunk
    got = counter.result()
    if got.sha256 != ref["sha256"]:
        logger.error("download aborted: blob %s (%s) read back as %s", ref["sha256"], name,
                     got.sha256)
        raise StorageError(f"blob {ref['sha256']} of {name} is corrupt", code="blob_corrupt")


def _mtime(manifest: Mapping[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(manifest.get("created_at"))).timestamp()
    except ValueError:
        return 0.0


def _members(store: AdapterStore, manifest: Mapping[str, Any]) -> Iterator[Member]:
    mtime = _mtime(manifest)
    for name, ref in sorted(manifest["files"].items()):
        layout.check_name(name, "file name")  # a member name never leaves the archive root
        yield Member(name=name, size=int(ref["size"]), mtime=mtime,
                     chunks=_verified_chunks(store.blobs, name, ref))


def open_archive_download(*, store: AdapterStore, tenant: str, adapter_id: str, fmt: str,
                          expires_s: int, signer: Storage | None = None) -> Download:
    """How to send the adapter in format `fmt` (an InvalidRequest for another format)."""
    fmt = check_format(fmt)
    if fmt == "tar":
        return open_download(store=store, tenant=tenant, adapter_id=adapter_id,
                             expires_s=expires_s, signer=signer)
    manifest = store.get_manifest(tenant, adapter_id)  # 404 now, before any byte is sent
    stream_fmt: StreamFormat = fmt
    return Download(filename=f"{adapter_id}.{fmt}", size=None,
                    stream=stream_archive(stream_fmt, _members(store, manifest)))
