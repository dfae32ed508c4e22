"""Turn what a user hands us (a directory, a .zip, a .tar.gz, raw bytes) into a directory.

Archives are extracted into a private directory under `extract_dir` (the service passes
its spool; the CLI falls back to the system temp dir). Only the adapter's two files are
written, from the adapter root (the archive root, or one top-level folder); every other
entry is checked but skipped. Entries that would land outside the root (absolute paths,
'..', links) refuse the archive. An archive is refused as `archive_too_large` before
anything is written past the bounds: more than MAX_ARCHIVE_ENTRIES entries, declared
sizes adding up to more than `extract_limit` (the service passes its upload limit), or,
counted while streaming (headers can lie), more than `extract_limit` bytes written.
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Collection
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from lorafold.budget import Budget
from lorafold.errors import InvalidAdapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin")
DEFAULT_EXTRACT_LIMIT = 8 * 1024**3     # offline use; the service passes its upload limit
MAX_ARCHIVE_ENTRIES = 1_000             # an adapter archive holds a handful
# zipfile holds its whole central directory in memory: ~1 KiB per entry is plenty.
MAX_ZIP_DIRECTORY_BYTES = MAX_ARCHIVE_ENTRIES * 1024
# Headers, padding and pax records around the members of a tar (per entry, generously).
TAR_OVERHEAD_BYTES = MAX_ARCHIVE_ENTRIES * 8 * 1024 + tarfile.RECORDSIZE
COPY_CHUNK = 1024 * 1024

ArchiveKind = Literal["zip", "tar.gz", "tar"]


class AdapterSource:
    """A directory holding an adapter, owning a temp dir when it came from an archive."""

    def __init__(self, directory: Path, tempdir: Path | None = None) -> None:
        self.directory = directory
        self._tempdir = tempdir

    def cleanup(self) -> None:
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None


def _escape(name: str) -> InvalidAdapter:
    return InvalidAdapter(f"archive entry {name!r} points outside the archive root",
                          code="archive_path_escape")


def _too_large(message: str) -> InvalidAdapter:
    return InvalidAdapter(message, code="archive_too_large")


def _pickle_refused(name: str) -> InvalidAdapter:
    return InvalidAdapter(
        f"{name}: pickled weights are refused (loading them can run code); "
        "convert the adapter to safetensors, e.g. save it again with "
        "save_pretrained(..., safe_serialization=True)", code="pickle_not_supported")


def _safe_member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise _escape(name)
    return path


def _check_count(count: int) -> None:
    if count > MAX_ARCHIVE_ENTRIES:
        raise _too_large(f"archive has more than {MAX_ARCHIVE_ENTRIES} entries")


def _archive_budget(limit: int) -> Budget:
    """Bytes an archive may expand to; one byte more refuses it."""
    return Budget(limit, lambda n: _too_large(f"archive expands past {n} bytes"))


class _BoundedStream:
    """A (decompressed) tar stream that refuses to be read or seeked past `limit` bytes,
    so that tarfile cannot be led far into a bomb, even by a header it reads whole."""

    def __init__(self, stream: io.BufferedIOBase, limit: int) -> None:
        self._stream = stream
        self._limit = limit

    def read(self, size: int = -1, /) -> bytes:
        room = self._limit - self._stream.tell()
        data = self._stream.read(room + 1 if size < 0 else min(size, room + 1))
        if len(data) > room:
            raise _too_large(f"archive expands past {self._limit} bytes")
        return data

    def seek(self, pos: int, whence: int = io.SEEK_SET, /) -> int:
        target = pos if whence == io.SEEK_SET else self._stream.tell() + pos
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target > self._limit:
            raise _too_large(f"archive expands past {self._limit} bytes")
        return self._stream.seek(target)

    def tell(self) -> int:
        return self._stream.tell()

    def write(self, data: bytes, /) -> int:
        raise io.UnsupportedOperation("read-only stream")

    def close(self) -> None:
        pass  # the caller owns the underlying stream


def _adapter_root(files: Collection[PurePosixPath],
                  dirs: Collection[PurePosixPath]) -> PurePosixPath:
    """The adapter may sit at the archive root or inside one top-level folder."""
    root = PurePosixPath()
    while root / CONFIG_NAME not in files:
        depth = len(root.parts)
        children = {p.parts[depth] for p in (*files, *dirs)
                    if len(p.parts) > depth and p.parts[:depth] == root.parts}
        children = {c for c in children if not c.startswith(("__MACOSX", "."))}
        if len(children) != 1:
            return root
        child = root / children.pop()
        if child not in dirs:
            return root
        root = child
    return root


def _plan(files: Collection[PurePosixPath],
          explicit_dirs: Collection[PurePosixPath]) -> dict[str, PurePosixPath]:
    """The entries to write, by the name they get: the adapter files of the adapter root."""
    dirs = {*explicit_dirs, *(parent for path in files for parent in path.parents)}
    root = _adapter_root(files, dirs)
    wanted = {name: root / name for name in (CONFIG_NAME, WEIGHTS_NAME) if root / name in files}
    if WEIGHTS_NAME not in wanted:
        pickled = [name for name in PICKLE_NAMES if root / name in files]
        if pickled:
            raise _pickle_refused(pickled[0])
    return wanted


def _copy(src: IO[bytes], target: Path, written: Budget) -> None:
    """Stream one member out, counting its real bytes against the budget before writing."""
    with src, target.open("wb") as out:
        while chunk := src.read(COPY_CHUNK):
            written.add(len(chunk))
            out.write(chunk)


def _check_zip_directory(payload: io.BufferedIOBase) -> None:
    """Refuse a central directory bigger than MAX_ARCHIVE_ENTRIES need before zipfile
    parses it (it holds every entry in memory). The size comes from zipfile's own
    end-record reader, so this check and its parse read the same record."""
    end = zipfile._EndRecData(payload)  # type: ignore[attr-defined]
    if end and end[zipfile._ECD_SIZE] > MAX_ZIP_DIRECTORY_BYTES:  # type: ignore[attr-defined]
        raise _too_large(f"archive has more than {MAX_ARCHIVE_ENTRIES} entries "
                         "(its central directory is too large)")
    payload.seek(0)


def _extract_zip(payload: io.BufferedIOBase, dest: Path, limit: int) -> None:
    _check_zip_directory(payload)
    with zipfile.ZipFile(payload) as archive:
        infos = archive.infolist()
        _check_count(len(infos))
        declared = _archive_budget(limit)
        files: dict[PurePosixPath, zipfile.ZipInfo] = {}
        dirs: set[PurePosixPath] = set()
        for info in infos:
            path = _safe_member_path(info.filename)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symlink in the zip
                raise _escape(info.filename)
            if info.is_dir():
                dirs.add(path)
                continue
            declared.add(info.file_size)
            files[path] = info
        written = _archive_budget(limit)
        for name, path in _plan(files, dirs).items():
            _copy(archive.open(files[path]), dest / name, written)


def _extract_tar(payload: io.BufferedIOBase, dest: Path, limit: int, *, compressed: bool) -> None:
    with gzip.GzipFile(fileobj=payload) if compressed else payload as stream:
        bounded = _BoundedStream(stream, limit + TAR_OVERHEAD_BYTES)
        with tarfile.open(fileobj=bounded, mode="r:") as archive:
            declared = _archive_budget(limit)  # checked per header: skipping a member reads it
            files: dict[PurePosixPath, tarfile.TarInfo] = {}
            dirs: set[PurePosixPath] = set()
            for count, member in enumerate(archive, start=1):
                _check_count(count)
                path = _safe_member_path(member.name)
                if member.issym() or member.islnk() or member.isdev():
                    raise _escape(member.name)
                if member.isdir():
                    dirs.add(path)
                elif member.isfile():
                    declared.add(member.size)
                    files[path] = member
            written = _archive_budget(limit)
            for name, path in _plan(files, dirs).items():
                src = archive.extractfile(files[path])
                if src is not None:
                    _copy(src, dest / name, written)


def _extract(kind: ArchiveKind, payload: Path | bytes, limit: int,
             extract_dir: Path | None) -> AdapterSource:
    tempdir = Path(tempfile.mkdtemp(prefix="lorafold-adapter-", dir=extract_dir))
    try:
        with payload.open("rb") if isinstance(payload, Path) else io.BytesIO(payload) as f:
            if kind == "zip":
                _extract_zip(f, tempdir, limit)
            else:
                _extract_tar(f, tempdir, limit, compressed=kind == "tar.gz")
    # RuntimeError: an encrypted zip entry; NotImplementedError: an unknown compression.
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error, RuntimeError,
            NotImplementedError) as e:
        shutil.rmtree(tempdir, ignore_errors=True)
        raise InvalidAdapter(f"archive cannot be read: {e}", code="invalid_archive") from e
    except BaseException:
        shutil.rmtree(tempdir, ignore_errors=True)
        raise
    return AdapterSource(tempdir, tempdir)


def _kind_of(head: bytes) -> ArchiveKind | None:
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def resolve_source(source: Path | str | bytes, *, extract_limit: int = DEFAULT_EXTRACT_LIMIT,
                   extract_dir: Path | None = None) -> AdapterSource:
    """A directory for `source`; archives (by content, not by name) are extracted into a
    new directory under `extract_dir` (default: the system temp dir)."""
    if isinstance(source, bytes):
        kind = _kind_of(source[:512])
        if kind is None:
            raise InvalidAdapter("uploaded bytes are neither a .zip nor a .tar.gz archive",
                                 code="invalid_archive")
        return _extract(kind, source, extract_limit, extract_dir)
    path = Path(source)
    if path.is_dir():
        return AdapterSource(path)
    if not path.exists():
        raise InvalidAdapter(f"{path}: no such file or directory", code="adapter_not_found")
    with path.open("rb") as f:
        kind = _kind_of(f.read(512))
    if kind is None:
        raise InvalidAdapter(f"{path.name}: not a directory, .zip or .tar.gz archive",
                             code="invalid_archive")
    return _extract(kind, path, extract_limit, extract_dir)


def check_files(directory: Path) -> tuple[Path, Path]:
    """The config and weights paths, or the reason they are not acceptable."""
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights.exists():
        pickled = [n for n in PICKLE_NAMES if (directory / n).exists()]
        if pickled:
            raise _pickle_refused(pickled[0])
        raise InvalidAdapter(f"{WEIGHTS_NAME} is missing", code="missing_weights")
    if not config.exists():
        raise InvalidAdapter(f"{CONFIG_NAME} is missing", code="missing_config")
    return config, weights
