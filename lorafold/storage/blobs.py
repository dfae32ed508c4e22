"""Content-addressed blobs: bytes stored under their sha256, read back and checked.

The sha256 is computed while the bytes stream in (to a `tmp/` key), then the object is
moved under `blobs/sha256/<hex>`; an identical blob already there is reused. Adapters and
data sets both keep their bytes this way and name them from their manifests; the owner a
blob is put for gets a reference marker (see `references`), so the blob goes when the
last manifest naming it does.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafold.errors import NotFound, StorageError
from lorafold.storage import layout
from lorafold.storage.base import DEFAULT_CHUNK_SIZE, ByteStream, HashingCounter, Storage
from lorafold.storage.locks import Locks
from lorafold.storage.references import BlobReferences, Owner


@dataclass(frozen=True)
class BlobRef:
    """A stored blob: its sha256 (hex) names it; size lets readers check what they got."""

    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


class BlobStore:
    """Put, open and download blobs on any `Storage`."""

    def __init__(self, storage: Storage, locks: Locks | None = None) -> None:
        self.storage = storage
        self.references = BlobReferences(storage, locks)

    def put_stream(self, chunks: Iterable[bytes], owner: Owner | None = None) -> BlobRef:
        """Store bytes under their sha256 (an identical existing blob is reused), referenced
        by `owner` (the manifest about to name it)."""
        tmp = layout.tmp_key()
        written = self.storage.put_stream(tmp, chunks)  # cleans up after itself on error
        try:
            self.references.place(tmp, written, owner)
        except BaseException:
            with contextlib.suppress(StorageError):
                self.storage.delete(tmp)
            raise
        return BlobRef(sha256=written.sha256, size=written.size)

    def put_file(self, path: Path, owner: Owner | None = None) -> BlobRef:
        return self.put_stream(file_chunks(Path(path)), owner)

    def open(self, ref: Mapping[str, Any], chunk_size: int = DEFAULT_CHUNK_SIZE) -> ByteStream:
        key = layout.blob_key(ref["sha256"])
        try:
            return self.storage.open_stream(key, chunk_size)
        except NotFound as e:
            # A manifest naming a missing blob is a broken store, not a user's 404.
            raise StorageError(f"blob {key} named by a manifest is missing",
                               code="blob_missing") from e

    def download(self, ref: Mapping[str, Any], dest: Path) -> None:
        """Write the blob to `dest` atomically, checking its sha256 and size."""
        counter = HashingCounter()
        with self.open(ref) as stream:
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

    def head(self, ref: Mapping[str, Any], size: int) -> bytes:
        """The first `size` bytes of the blob; reading stops there."""
        data = bytearray()
        with self.open(ref, chunk_size=min(max(size, 1), DEFAULT_CHUNK_SIZE)) as stream:
            for chunk in stream:
                data += chunk
                if len(data) >= size:
                    break
        return bytes(data[:size])

    def read(self, ref: Mapping[str, Any]) -> bytes:
        """A small blob's bytes (manifest-sized things, not adapters)."""
        with self.open(ref) as stream:
            data = b"".join(stream)
        if len(data) != ref["size"]:
            raise StorageError(f"blob {ref['sha256']} read back as {len(data)} bytes, "
                               f"expected {ref['size']}", code="blob_corrupt")
        return data


def file_chunks(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk
    except OSError as e:
        raise StorageError(f"cannot read local file {path}: {e}") from e
