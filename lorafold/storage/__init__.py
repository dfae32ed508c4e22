"""Object storage: one small `Storage` interface, a filesystem and an S3 backend, and the
adapter store (content-addressed blobs plus per-adapter manifests) built on top."""

from lorafold.storage.base import DEFAULT_CHUNK_SIZE, ByteStream, PutResult, Storage
from lorafold.storage.filesystem import FilesystemStorage
from lorafold.storage.resolve import resolve_storage

__all__ = ["DEFAULT_CHUNK_SIZE", "ByteStream", "FilesystemStorage", "PutResult", "Storage",
           "resolve_storage"]
