"""Adapters as the service shows them: records, public views, publishing, downloads.

An adapter's manifest (written by `AdapterStore.publish`) carries a `record` with what
the API shows; `adapter_view` turns a manifest into that public dict. The record is checked
against the public schema before anything is stored (`check_record`), so whatever is
stored can be listed. Every adapter is stored as its files (blobs) plus one uncompressed
tar of them for downloads: safetensors barely compress, and a tar is written at disk speed
and accepted back by uploads.
"""

from __future__ import annotations

import logging
import tarfile
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafold.adapters import open_adapter
from lorafold.adapters.source import CONFIG_NAME, WEIGHTS_NAME
from lorafold.adapters.writer import LINEAGE_NAME
from lorafold.errors import Conflict, InvalidAdapter, InvalidRequest
from lorafold.storage import Storage, layout
from lorafold.storage.adapters import AdapterStore

if TYPE_CHECKING:  # the context imports the stores; only types are needed here
    from lorafold.jobs import JobRecord
    from lorafold.service.context import ServiceContext

logger = logging.getLogger(__name__)

Source = Literal["upload", "merge", "unlearn"]
ADAPTER_ID_PREFIX = "ad_"
ARCHIVE_NAME = "adapter.tar"
PUBLISHED_FILES = (CONFIG_NAME, WEIGHTS_NAME, LINEAGE_NAME)
MAX_NAME_LENGTH = 200
ARCHIVE_COPY_BUFFER = 4 * 1024 * 1024


def new_adapter_id() -> str:
    return ADAPTER_ID_PREFIX + uuid.uuid4().hex


def adapter_id_for_job(job_id: str) -> str:
    """The output id of a job: fixed by the job id, so a retried job overwrites its output."""
    return ADAPTER_ID_PREFIX + job_id.removeprefix("job_")


def check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise InvalidRequest(f"name must be 1 to {MAX_NAME_LENGTH} printable characters",
                             code="invalid_name")
    return name


def adapter_record(summary: Mapping[str, Any], *, name: str, source: Source,
                   parents: Sequence[str] = (), metadata: Mapping[str, Any] | None = None,
                   job_id: str | None = None) -> dict[str, Any]:
    """What the manifest keeps about an adapter besides its blobs (all JSON), from the
    core library's `LoraAdapter.summary()`."""
    return {
        "name": name,
        "source": source,
        "parents": list(parents),
        "metadata": dict(metadata or {}),
        "job_id": job_id,
        "base_model": summary["base_model"],
        "r": summary["r"],
        "alpha": summary["alpha"],
        "target_modules": summary["target_modules"],
        "module_count": summary["module_count"],
        "dtype": summary["dtype"],
        "size_bytes": summary["size_bytes"],
        "sha256": summary["sha256"],
    }


class AdapterRecordSchema(BaseModel):
    """A manifest's record as the API's AdapterPublic (app/schemas.py) shows it, checked
    strictly (no coercion, finite numbers), so a record that passes always serialises."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    name: str
    source: Source
    parents: list[str]
    metadata: dict[str, Any]
    job_id: str | None
    base_model: str | None
    r: int
    alpha: float
    target_modules: list[str] | str | None
    module_count: int = Field(ge=0)
    dtype: str
    size_bytes: int = Field(ge=0)
    sha256: str


class AdapterViewSchema(AdapterRecordSchema):
    """An adapter's public view: its record plus what the store adds."""

    id: str
    created_at: str
    archive_size_bytes: int = Field(ge=0)


def _schema_problem(schema: type[BaseModel], data: Mapping[str, Any]) -> str | None:
    try:
        schema.model_validate(dict(data))
    except ValidationError as e:
        return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(record)'}: "
                         f"{err['msg']}" for err in e.errors()[:5])
    return None


def check_record(record: Mapping[str, Any]) -> None:
    """Refuse a record the API could not show (a field of the wrong type, say)."""
    problem = _schema_problem(AdapterRecordSchema, record)
    if problem is not None:
        raise InvalidAdapter(f"the adapter cannot be listed as it is: {problem}",
                             code="invalid_adapter_record")


def adapter_view(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The public view of a stored adapter (the API's AdapterPublic)."""
    record = manifest.get("record", {})
    return {
        "id": manifest["id"],
        "created_at": manifest.get("created_at"),
        "archive_size_bytes": manifest["archive"]["size"],
        **{key: record.get(key) for key in (
            "name", "source", "parents", "metadata", "job_id", "base_model", "r", "alpha",
            "target_modules", "module_count", "dtype", "size_bytes", "sha256")},
    }


def adapter_files(directory: Path) -> dict[str, Path]:
    """The files of an adapter directory that are stored (PEFT files, lorafold.json)."""
    return {name: directory / name for name in PUBLISHED_FILES if (directory / name).is_file()}


def write_archive(files: Mapping[str, Path], dest: Path) -> Path:
    """An uncompressed tar holding `files` at its root, under their names."""
    with tarfile.TarFile(dest, "w", format=tarfile.PAX_FORMAT,
                         copybufsize=ARCHIVE_COPY_BUFFER) as tar:
        for name, path in files.items():
            tar.add(str(path), arcname=name, recursive=False)
    return dest


def publish_adapter(*, store: AdapterStore, tenant: str, adapter_id: str, directory: Path,
                    record: Mapping[str, Any], work_dir: Path,
                    archive: Path | None = None) -> dict[str, Any]:
    """Store the adapter in `directory` (its PEFT files, and lorafold.json if any), with
    `archive` as its download when the caller already built it from the same files."""
    check_record(record)
    files = adapter_files(directory)
    if archive is None:
        archive = write_archive(files, work_dir / ARCHIVE_NAME)
    manifest = store.publish(tenant=tenant, adapter_id=adapter_id, files=files,
                             archive=archive, record=record, archive_format="tar")
    return adapter_view(manifest)


def publish_job_output(ctx: ServiceContext, record: JobRecord, out_dir: Path, work_dir: Path,
                       *, source: Source, parents: Sequence[str],
                       metadata: Mapping[str, Any] | None = None) -> str:
    """Publish the adapter a job wrote to `out_dir` under the job's output id; the id."""
    output_id = adapter_id_for_job(record.id)
    with open_adapter(out_dir, label=output_id) as output:
        stored = adapter_record(output.summary(), name=record.params["name"], source=source,
                                parents=parents, metadata=metadata, job_id=record.id)
    publish_adapter(store=ctx.adapters, tenant=record.tenant, adapter_id=output_id,
                    directory=out_dir, record=stored, work_dir=work_dir)
    return output_id


def list_adapters(*, store: AdapterStore, tenant: str) -> list[dict[str, Any]]:
    """The tenant's adapters, newest first. A record stored before `check_record` existed
    that the API cannot show is left out (and logged) rather than failing the listing."""
    views = []
    for manifest in store.list_manifests(tenant):
        view = adapter_view(manifest)
        problem = _schema_problem(AdapterViewSchema, view)
        if problem is not None:
            logger.error("adapter %s of tenant %s is not listed: its record is invalid: %s",
                         view["id"], tenant, problem)
            continue
        views.append(view)
    return views


def get_adapter(*, store: AdapterStore, tenant: str, adapter_id: str) -> dict[str, Any]:
    """One adapter's view; a record the API cannot show (stored before `check_record`
    existed) is a 409 that says what to do, not a 500."""
    view = adapter_view(store.get_manifest(tenant, adapter_id))
    problem = _schema_problem(AdapterViewSchema, view)
    if problem is not None:
        raise Conflict(f"adapter {adapter_id}'s stored record is invalid ({problem}); delete "
                       "it and upload it again", code="invalid_adapter_record")
    return view


def delete_adapter(*, ctx: ServiceContext, tenant: str, adapter_id: str) -> None:
    """Delete the adapter and every blob of it no other adapter or data set names (409
    `adapter_in_use` while a queued or running job reads it)."""
    from lorafold.service.job_inputs import check_not_in_use, holding_items

    with holding_items(ctx, tenant, [("adapters", adapter_id)]):
        ctx.adapters.get_manifest(tenant, adapter_id)  # 404 before 409
        check_not_in_use(ctx, tenant, "adapters", adapter_id)
        ctx.adapters.delete(tenant, adapter_id)


@dataclass(frozen=True)
class Download:
    """Either a presigned URL to redirect to, or a byte stream to send (`size` None when
    it is only known once sent: an archive built while streaming)."""

    filename: str
    size: int | None
    url: str | None = None
    stream: Iterator[bytes] | None = None


def open_download(*, store: AdapterStore, tenant: str, adapter_id: str, expires_s: int,
                  signer: Storage | None = None) -> Download:
    """How to send the adapter's archive: a presigned URL (from `signer`, the storage as
    clients reach it, by default the store's own) when the storage has them, else a stream."""
    manifest = store.get_manifest(tenant, adapter_id)
    archive = manifest["archive"]
    filename = f"{adapter_id}.{archive['format']}"
    size = int(archive["size"])
    url = (signer or store.storage).presigned_url(layout.blob_key(archive["sha256"]),
                                                  expires_s, filename=filename)
    if url is not None:
        return Download(filename=filename, size=size, url=url)
    return Download(filename=filename, size=size,
                    stream=store.open_archive(tenant, adapter_id))


def preflight_adapter(*, store: AdapterStore, tenant: str, adapter_id: str, target: str,
                      spool: Path) -> dict[str, Any]:
    """Whether serving engine `target` will load a stored adapter: the verdict per rule
    (lorafold.adapters.serving). The files are fetched into the spool for the check and
    removed after it."""
    from lorafold.adapters import open_adapter
    from lorafold.adapters.serving import check_target, preflight

    check_target(target)
    with tempfile.TemporaryDirectory(prefix="preflight-", dir=spool) as tmp:
        directory = store.fetch_files(tenant, adapter_id, Path(tmp) / "adapter")
        with open_adapter(directory, label=adapter_id) as adapter:
            return {"adapter_id": adapter_id, **preflight(adapter, target).to_dict()}
