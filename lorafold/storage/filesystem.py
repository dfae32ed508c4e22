"""Object storage in a local directory (development, single host, tests).

Every write goes to a hidden temporary file beside its target, is fsynced, and is then
renamed over the target with `os.replace`, so readers see the old object or the new one,
never a partial one, and a crash leaves at most a dot-file that listings skip.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from lorafold.errors import StorageError
from lorafold.storage.base import (
    DEFAULT_CHUNK_SIZE,
    ByteStream,
    HashingCounter,
    PutResult,
    object_not_found,
    validate_key,
    validate_prefix,
)

logger = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"


class FilesystemStorage:
    """`Storage` over a directory; keys map to relative paths below `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create storage directory {self.root}: {e}") from e

    def __repr__(self) -> str:
        return f"FilesystemStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        path = self._path(key)
        counter = HashingCounter()
        with _io_errors("write", key):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX + path.name)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:  # the caller's errors pass through unchanged
                    counter.update(chunk)
                    with _io_errors("write", key):
                        f.write(chunk)
                with _io_errors("write", key):
                    f.flush()
                    os.fsync(f.fileno())
            with _io_errors("write", key):
                os.replace(tmp, path)
                _fsync_dir(path.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return counter.result()

    def put_bytes(self, key: str, data: bytes) -> PutResult:
        return self.put_stream(key, [data])

    def open_stream(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ByteStream:
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - ByteStream closes it
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise object_not_found(key) from e
        except OSError as e:
            raise StorageError(f"cannot read object {key!r}: {e}") from e
        return ByteStream(f, key=key, chunk_size=chunk_size, errors=(OSError,))

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.open_stream(key))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _io_errors("delete", key):
            if path.is_dir():
                return  # a "directory" is not an object
            path.unlink(missing_ok=True)

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        # Walk only the deepest directory the prefix names completely.
        base_dir = self.root.joinpath(*prefix.split("/")[:-1])
        keys: list[str] = []
        with _io_errors("list", prefix):
            for dirpath, dirnames, filenames in os.walk(base_dir):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel = Path(dirpath).relative_to(self.root).as_posix()
                for name in filenames:
                    if name.startswith("."):
                        continue  # our temporary files
                    key = name if rel == "." else f"{rel}/{name}"
                    if key.startswith(prefix):
                        keys.append(key)
        return iter(sorted(keys))

    def copy(self, src: str, dst: str) -> None:
        validate_key(dst)
        with self.open_stream(src) as stream:
            self.put_stream(dst, stream)

    def move(self, src: str, dst: str) -> None:
        src_path, dst_path = self._path(src), self._path(dst)
        if not src_path.is_file():
            raise object_not_found(src)
        with _io_errors("move", src):
            dst_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(src_path, dst_path)
            except FileNotFoundError as e:
                raise object_not_found(src) from e
            _fsync_dir(dst_path.parent)

    def presigned_url(self, key: str, expires_s: int = 3600, *,
                      filename: str | None = None) -> str | None:
        validate_key(key)
        return None

    def ping(self) -> None:
        if not self.root.is_dir():
            raise StorageError(f"storage directory {self.root} does not exist")
        if not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
            raise StorageError(f"storage directory {self.root} is not writable")


@contextlib.contextmanager
def _io_errors(op: str, key: str) -> Iterator[None]:
    """Turn OSError into StorageError, naming the operation and key."""
    try:
        yield
    except OSError as e:
        raise StorageError(f"cannot {op} object {key!r}: {e}") from e


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: fsync the directory entry (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        logger.debug("fsync of directory %s not supported", directory)
    finally:
        os.close(fd)
