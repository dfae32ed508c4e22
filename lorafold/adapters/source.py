"""Turn what a user hands us (a directory, a .zip, a .tar.gz, raw bytes) into a directory.

Archives are extracted into a private temporary directory. Entries that would land
outside it (absolute paths, '..', links) are refused, not skipped, and the total size is
capped so a small archive cannot expand into a disk-filling one.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from lorafold.errors import InvalidAdapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin")
DEFAULT_EXTRACT_LIMIT = 8 * 1024**3


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


def _safe_member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise _escape(name)
    return path


def _extract_zip(data: zipfile.ZipFile, dest: Path, limit: int) -> None:
    total = 0
    for info in data.infolist():
        rel = _safe_member_path(info.filename)
        mode = (info.external_attr >> 16) & 0o170000
        if mode == 0o120000:  # a symlink stored in the zip
            raise _escape(info.filename)
        total += info.file_size
        if total > limit:
            raise InvalidAdapter(f"archive expands past {limit} bytes", code="archive_too_large")
        target = dest / rel
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with data.open(info) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, 1024 * 1024)


def _extract_tar(data: tarfile.TarFile, dest: Path, limit: int) -> None:
    total = 0
    for member in data.getmembers():
        rel = _safe_member_path(member.name)
        if member.issym() or member.islnk() or member.isdev():
            raise _escape(member.name)
        if member.isdir():
            (dest / rel).mkdir(parents=True, exist_ok=True)
            continue
        if not member.isfile():
            continue
        total += member.size
        if total > limit:
            raise InvalidAdapter(f"archive expands past {limit} bytes", code="archive_too_large")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        src = data.extractfile(member)
        if src is None:
            continue
        with src, target.open("wb") as out:
            shutil.copyfileobj(src, out, 1024 * 1024)


def _adapter_root(directory: Path) -> Path:
    """The adapter may sit at the archive root or inside one top-level folder."""
    if (directory / CONFIG_NAME).exists():
        return directory
    children = [p for p in directory.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    if len(children) == 1 and children[0].is_dir():
        return _adapter_root(children[0])
    return directory


def _extract(opener: str, payload: Path | bytes, limit: int) -> AdapterSource:
    tempdir = Path(tempfile.mkdtemp(prefix="lorafold-adapter-"))
    try:
        if opener == "zip":
            handle = zipfile.ZipFile(payload if isinstance(payload, Path) else io.BytesIO(payload))
            with handle:
                _extract_zip(handle, tempdir, limit)
        else:
            fileobj = None if isinstance(payload, Path) else io.BytesIO(payload)
            name = payload if isinstance(payload, Path) else None
            with tarfile.open(name=name, fileobj=fileobj, mode="r:*") as tar:
                _extract_tar(tar, tempdir, limit)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(tempdir, ignore_errors=True)
        raise InvalidAdapter(f"archive cannot be read: {e}", code="invalid_archive") from e
    except BaseException:
        shutil.rmtree(tempdir, ignore_errors=True)
        raise
    return AdapterSource(_adapter_root(tempdir), tempdir)


def _kind_of(head: bytes) -> str | None:
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar":
        return "tar"
    return None


def resolve_source(source: Path | str | bytes, *,
                   extract_limit: int = DEFAULT_EXTRACT_LIMIT) -> AdapterSource:
    """A directory for `source`; archives (by content, not by name) are extracted."""
    if isinstance(source, bytes):
        kind = _kind_of(source[:512])
        if kind is None:
            raise InvalidAdapter("uploaded bytes are neither a .zip nor a .tar.gz archive",
                                 code="invalid_archive")
        return _extract(kind, source, extract_limit)
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
    return _extract(kind, path, extract_limit)


def check_files(directory: Path) -> tuple[Path, Path]:
    """The config and weights paths, or the reason they are not acceptable."""
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights.exists():
        pickled = [n for n in PICKLE_NAMES if (directory / n).exists()]
        if pickled:
            raise InvalidAdapter(
                f"{pickled[0]}: pickled weights are refused (loading them can run code); "
                "convert the adapter to safetensors, e.g. save it again with "
                "save_pretrained(..., safe_serialization=True)", code="pickle_not_supported")
        raise InvalidAdapter(f"{WEIGHTS_NAME} is missing", code="missing_weights")
    if not config.exists():
        raise InvalidAdapter(f"{CONFIG_NAME} is missing", code="missing_config")
    return config, weights
