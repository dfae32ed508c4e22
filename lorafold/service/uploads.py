"""Uploads: spool the parts to disk while counting and hashing, then validate, then publish.

The HTTP layer feeds an `UploadSpool` chunk by chunk (it never holds a whole file); the
spool counts every byte of the request against the limit (`PayloadTooLarge` → 413) and
hashes each file as it is written. An archive is unpacked into the spool, bounded by the
same limit (what it expands to, its entries: `archive_too_large` → 422; see
`lorafold.adapters.source`). `create_adapter` then validates the adapter with the
core library (`open_adapter(...).validate()` reads every tensor; see `validation.py` for
where that runs) and only then publishes it, so a refused adapter leaves nothing in
storage and nothing listed.

Accepted forms: the PEFT files as parts named by their file names (adapter_config.json
and adapter_model.safetensors; a pickled adapter_model.bin is accepted only to be refused
with a helpful code), or one archive (.zip, .tar.gz, .tgz, .tar); plus `name` and an
optional `metadata` JSON object.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from lorafold.adapters.source import resolve_source
from lorafold.budget import Budget
from lorafold.errors import AdapterNotFound, InvalidRequest, PayloadTooLarge
from lorafold.jobs import body_hash
from lorafold.service.adapters import (
    ARCHIVE_NAME,
    adapter_files,
    adapter_record,
    check_name,
    get_adapter,
    new_adapter_id,
    publish_adapter,
    write_archive,
)
from lorafold.service.context import ServiceContext
from lorafold.service.idempotency import idempotent
from lorafold.service.quotas import check_storage_quota, tenant_stored_bytes
from lorafold.service.validation import Inspection

logger = logging.getLogger(__name__)

ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors",
                           "adapter_model.bin"})
IGNORED_FILES = frozenset({"README.md", "lorafold.json", "training_args.bin"})
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
FILE_FIELDS = frozenset({"files", "file", "archive"})
TEXT_FIELDS = frozenset({"name", "metadata"})
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 16


class ByteBudget(Budget):
    """Counts the bytes of one request; past `limit` it raises PayloadTooLarge."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit, lambda n: PayloadTooLarge(
            f"the upload exceeds the limit of {n} bytes", limit=n))

    @property
    def exceeded(self) -> bool:
        return self.used > self.limit


class SpooledFile:
    """A file being received: written to disk and hashed as its chunks arrive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._handle = path.open("wb")

    def write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._handle.write(chunk)
        self.size += len(chunk)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def _basename(filename: str) -> str:
    """The last path segment of a client-sent file name (either slash), no dot-names."""
    name = PureWindowsPath(PurePosixPath(filename).name).name.strip()
    if not name or name.startswith(".") or not name.isprintable():
        raise InvalidRequest(f"file name {filename!r} is not acceptable",
                             code="invalid_upload")
    return name


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass
class UploadSpool:
    """The parts of one upload on disk, in a private temporary directory."""

    root: Path
    files: dict[str, SpooledFile] = field(default_factory=dict)
    archive: SpooledFile | None = None
    fields: dict[str, str] = field(default_factory=dict)
    parts: int = 0

    @classmethod
    def create(cls, parent: Path) -> UploadSpool:
        root = Path(tempfile.mkdtemp(prefix="upload-", dir=parent))
        (root / "files").mkdir()
        return cls(root=root)

    def _count_part(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidRequest(f"an upload has at most {MAX_PARTS} parts",
                                 code="invalid_upload")

    def open_file(self, field_name: str, filename: str) -> SpooledFile | None:
        """Where a file part goes; None for a file we ignore (PEFT's README.md)."""
        self._count_part()
        if field_name not in FILE_FIELDS:
            raise InvalidRequest(f"unexpected file field {field_name!r} (use 'files' or "
                                 "'archive')", code="invalid_upload")
        name = _basename(filename)
        if field_name == "archive" or is_archive_name(name):
            if self.archive is not None:
                raise InvalidRequest("send one archive per upload", code="invalid_upload")
            suffix = next(s for s in ARCHIVE_SUFFIXES if name.lower().endswith(s)) \
                if is_archive_name(name) else ".bin"
            self.archive = SpooledFile(self.root / f"archive{suffix}")
            return self.archive
        if name in IGNORED_FILES:
            return None
        if name not in ADAPTER_FILES:
            raise InvalidRequest(
                f"unexpected file {name!r}: send adapter_config.json and "
                "adapter_model.safetensors, or one .zip/.tar.gz archive", code="invalid_upload")
        if name in self.files:
            raise InvalidRequest(f"file {name!r} was sent twice", code="invalid_upload")
        spooled = SpooledFile(self.root / "files" / name)
        self.files[name] = spooled
        return spooled

    def set_field(self, name: str, value: bytes) -> None:
        self._count_part()
        if name not in TEXT_FIELDS:
            raise InvalidRequest(f"unexpected form field {name!r} (expected name, metadata)",
                                 code="invalid_upload")
        if len(value) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"form field {name!r} is longer than {MAX_FIELD_BYTES} bytes",
                                 code="invalid_upload")
        try:
            self.fields[name] = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"form field {name!r} is not UTF-8",
                                 code="invalid_upload") from e

    def close_files(self) -> None:
        for spooled in [*self.files.values(), self.archive]:
            if spooled is not None:
                spooled.close()

    def cleanup(self) -> None:
        self.close_files()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class UploadForm:
    name: str
    metadata: dict[str, Any]
    source: Path                   # a directory of files, or an archive
    fingerprint: str               # identifies the request for Idempotency-Key


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    """A JSON number as a float, refused when it overflows (1e999 parses as inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a number")
    return value


def _metadata(raw: str | None) -> dict[str, Any]:
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except ValueError as e:
        raise InvalidRequest(f"metadata is not valid JSON: {e}", code="invalid_metadata") from e
    if not isinstance(value, dict):
        raise InvalidRequest("metadata must be a JSON object", code="invalid_metadata")
    return value


def read_form(spool: UploadSpool) -> UploadForm:
    """Check the shape of the upload (which parts came) before looking inside the files."""
    spool.close_files()
    if spool.archive is not None and spool.files:
        raise InvalidRequest("send either the adapter files or one archive, not both",
                             code="invalid_upload")
    if spool.archive is None and not spool.files:
        raise InvalidRequest("no adapter in the upload: send adapter_config.json and "
                             "adapter_model.safetensors, or one archive", code="invalid_upload")
    name = check_name(spool.fields.get("name") or "adapter")
    metadata = _metadata(spool.fields.get("metadata"))
    digests: dict[str, Any] = {n: f.sha256 for n, f in sorted(spool.files.items())}
    if spool.archive is not None:
        digests = {"archive": spool.archive.sha256}
    source = spool.archive.path if spool.archive is not None else spool.root / "files"
    fingerprint = body_hash({"name": name, "metadata": metadata, "files": digests})
    return UploadForm(name=name, metadata=metadata, source=source, fingerprint=fingerprint)


def _validate(ctx: ServiceContext, spool: UploadSpool,
              form: UploadForm) -> tuple[Inspection, Path | None]:
    """Unpack an archive into the spool (its adapter files only, at most the upload limit
    of bytes), then validate (every tensor is read) while building the download archive
    in a thread, as both only read the spooled files. Nothing is stored yet."""
    directory = form.source
    if spool.archive is not None:
        directory = resolve_source(form.source, extract_limit=ctx.settings.max_upload_bytes,
                                   extract_dir=spool.root).directory
    with ThreadPoolExecutor(max_workers=1) as pool:
        archive = pool.submit(write_archive, adapter_files(directory),
                              spool.root / ARCHIVE_NAME)
        inspection = ctx.validator.inspect(directory)
        return inspection, archive.result()


def _stored_size(directory: Path, archive: Path | None) -> int:
    """What publishing the adapter adds to the tenant's stored bytes: files and archive."""
    files = sum(path.stat().st_size for path in adapter_files(directory).values())
    return files + (archive.stat().st_size if archive is not None else files)


def replayed_view(ctx: ServiceContext, tenant: str, replay: dict[str, Any]) -> dict[str, Any]:
    """What a replayed POST /v1/adapters answers: the adapter as it is now, or the first
    answer if it was deleted since."""
    try:
        return get_adapter(store=ctx.adapters, tenant=tenant, adapter_id=replay["id"])
    except AdapterNotFound:
        return replay


def create_adapter(*, ctx: ServiceContext, tenant: str, spool: UploadSpool,
                   idempotency_key: str | None = None) -> dict[str, Any]:
    """Validate the spooled upload and publish it; returns the adapter's public view."""
    form = read_form(spool)
    with idempotent(ctx.idempotency, tenant=tenant, scope="adapters", key=idempotency_key,
                    fingerprint=form.fingerprint) as claim:
        if claim.replay is not None:
            return replayed_view(ctx, tenant, claim.replay)
        adapter_id = new_adapter_id()
        started = time.perf_counter()
        inspection, archive = _validate(ctx, spool, form)
        validated = time.perf_counter()
        check_storage_quota(ctx.settings, tenant=tenant, used=tenant_stored_bytes(ctx, tenant),
                            adding=_stored_size(inspection.directory, archive))
        record = adapter_record(inspection.summary, name=form.name, source="upload",
                                metadata=form.metadata)
        view = publish_adapter(store=ctx.adapters, tenant=tenant, adapter_id=adapter_id,
                               directory=inspection.directory, record=record,
                               work_dir=spool.root, archive=archive)
        logger.info("adapter %s uploaded by tenant %s (%d bytes; validated in %.2fs, "
                    "published in %.2fs)", adapter_id, tenant, view["size_bytes"],
                    validated - started, time.perf_counter() - validated)
        claim.value = view
        return view
