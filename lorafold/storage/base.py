"""The small object-store interface every storage backend implements.

Keys are '/'-separated relative strings (`blobs/sha256/ab12...`). A segment may not be
empty or start with '.', which keeps '.'/'..' out and leaves dot-names free for the
backends' own temporary files. Missing keys raise `NotFound` (code "object_not_found");
I/O failures raise `StorageError` chained to the original exception.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, runtime_checkable

from lorafold.errors import InvalidRequest, NotFound, StorageError

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1024 * 1024
OBJECT_NOT_FOUND = "object_not_found"
_MAX_KEY_BYTES = 1024  # S3's limit; we hold the filesystem to it too


@dataclass(frozen=True)
class PutResult:
    """What was written: byte count and hex sha256, both computed while streaming."""

    size: int
    sha256: str


@runtime_checkable
class Storage(Protocol):
    """A flat key → bytes store (filesystem directory or S3 bucket)."""

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        """Write `chunks` to `key` without holding the whole object; all or nothing."""
        ...

    def put_bytes(self, key: str, data: bytes) -> PutResult: ...

    def open_stream(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ByteStream:
        """Open `key` now (NotFound is raised here, not on first read); iterate its bytes."""
        ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error (deletes are idempotent)."""
        ...

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with `prefix` (a plain string prefix), in lexicographic order."""
        ...

    def copy(self, src: str, dst: str) -> None: ...

    def move(self, src: str, dst: str) -> None:
        """Rename where the backend can (filesystem), else copy then delete."""
        ...

    def presigned_url(self, key: str, expires_s: int = 3600, *,
                      filename: str | None = None) -> str | None:
        """A time-limited GET URL, or None when the backend has none (filesystem)."""
        ...

    def ping(self) -> None:
        """Raise StorageError unless the store is reachable and usable (for /readyz)."""
        ...


def validate_key(key: str) -> str:
    """Return `key` if it is a well-formed object key, else raise InvalidRequest."""
    if not isinstance(key, str) or not key:
        raise InvalidRequest(f"invalid storage key {key!r}: empty", code="invalid_storage_key")
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES or "\\" in key or "\x00" in key:
        raise InvalidRequest(f"invalid storage key {key!r}", code="invalid_storage_key")
    for segment in key.split("/"):
        if not segment or segment.startswith("."):
            raise InvalidRequest(f"invalid storage key {key!r}: segment {segment!r}",
                                 code="invalid_storage_key")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: '' or a key, optionally ending in '/'."""
    if prefix:
        validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def object_not_found(key: str) -> NotFound:
    return NotFound(f"object {key!r} not found", code=OBJECT_NOT_FOUND, key=key)


class HashingCounter:
    """Running sha256 and size of the bytes seen so far."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)

    def result(self) -> PutResult:
        return PutResult(size=self.size, sha256=self._hash.hexdigest())


class Readable(Protocol):
    """What ByteStream reads from: an open file or an HTTP response body."""

    def read(self, size: int, /) -> bytes: ...

    def close(self) -> None: ...


class ByteStream(Iterator[bytes]):
    """Iterate a readable binary object in chunks; close it at the end, on close() or GC.

    A plain generator would leave the underlying file or HTTP body open until garbage
    collection if the consumer never starts or stops early (e.g. a client disconnects).
    """

    def __init__(self, raw: Readable, *, key: str, chunk_size: int,
                 errors: tuple[type[BaseException], ...],
                 close: Callable[[], None] | None = None) -> None:
        self._read: Callable[[int], bytes] | None = None  # set last: __del__ may run early
        self._key = key
        self._chunk_size = chunk_size
        self._errors = errors
        self._close: Callable[[], None] = close if close is not None else raw.close
        if chunk_size <= 0:
            self._close()
            raise ValueError("chunk_size must be positive")
        self._read = raw.read

    def __iter__(self) -> ByteStream:
        return self

    def __next__(self) -> bytes:
        if self._read is None:
            raise StopIteration
        try:
            chunk = self._read(self._chunk_size)
        except self._errors as e:
            self.close()
            raise StorageError(f"reading object {self._key!r} failed: {e}") from e
        if not chunk:
            self.close()
            raise StopIteration
        return bytes(chunk)

    def close(self) -> None:
        if self._read is not None:
            self._read = None
            try:
                self._close()
            except self._errors:
                logger.debug("closing stream of %r failed", self._key, exc_info=True)

    def __enter__(self) -> ByteStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
