"""Build a storage backend from a URL (the settings object calls this once)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from lorafold.errors import InvalidRequest
from lorafold.storage.base import Storage
from lorafold.storage.filesystem import FilesystemStorage


def resolve_storage(url: str, **s3_options: Any) -> Storage:
    """`file:///path` or a bare path → FilesystemStorage; `s3://bucket[/prefix]` → S3Storage.

    `s3_options` (endpoint_url, region, access_key, secret_key, path_style, create_bucket,
    ...) go to S3Storage and are ignored for filesystem URLs, so callers can always pass
    the same settings.
    """
    if not url:
        raise InvalidRequest("storage URL is empty", code="invalid_storage_url")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        if not parts.netloc:
            raise InvalidRequest(f"storage URL {url!r} names no bucket",
                                 code="invalid_storage_url")
        from lorafold.storage.s3 import S3Storage  # boto3 only when S3 is used

        return S3Storage(parts.netloc, prefix=unquote(parts.path).strip("/"), **s3_options)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidRequest(f"storage URL {url!r}: remote file hosts are not supported",
                                 code="invalid_storage_url")
        return FilesystemStorage(Path(unquote(parts.path)))
    if scheme == "":  # a bare path
        return FilesystemStorage(Path(url).expanduser())
    raise InvalidRequest(f"storage URL {url!r}: unsupported scheme {parts.scheme!r} "
                         "(use file:///path, a path, or s3://bucket)",
                         code="invalid_storage_url")
