"""Data sets for unlearning: validated on upload, stored, read back by jobs.

`create_dataset` parses the spooled JSONL line by line (`parse_jsonl`: the error names
the line) and only then stores it, so a refused file leaves nothing behind and a job
never meets a malformed one. Jobs read data sets back with `load_dataset`.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from lorafold.errors import DatasetNotFound
from lorafold.jobs import body_hash
from lorafold.service.adapters import check_name
from lorafold.service.context import ServiceContext
from lorafold.service.idempotency import idempotent
from lorafold.service.job_inputs import check_not_in_use, holding_items
from lorafold.service.quotas import check_examples, check_storage_quota, tenant_stored_bytes
from lorafold.unlearn.datasets import TextDataset, parse_jsonl

logger = logging.getLogger(__name__)

DATASET_ID_PREFIX = "ds_"


def new_dataset_id() -> str:
    return DATASET_ID_PREFIX + uuid.uuid4().hex


def dataset_record(dataset: TextDataset, *, name: str, size: int, sha256: str
                   ) -> dict[str, Any]:
    """What the manifest keeps besides the file: counts and the records' fingerprint."""
    pairs = sum(1 for example in dataset if example.prompt)
    return {"name": name, "examples": len(dataset), "prompt_completion_examples": pairs,
            "text_examples": len(dataset) - pairs, "size_bytes": size, "sha256": sha256,
            "fingerprint": dataset.fingerprint()}


def dataset_view(manifest: dict[str, Any]) -> dict[str, Any]:
    """The public view of a stored data set (the API's DatasetPublic)."""
    return {"id": manifest["id"], "created_at": manifest.get("created_at"),
            **manifest["record"]}


def _parse_file(path: Path, *, name: str, max_bytes: int) -> TextDataset:
    with path.open("rb") as handle:
        return parse_jsonl(handle, name=name, max_bytes=max_bytes)


def create_dataset(*, ctx: ServiceContext, tenant: str, path: Path, sha256: str, name: str,
                   idempotency_key: str | None = None) -> dict[str, Any]:
    """Validate the spooled JSONL at `path` and store it; returns the public view."""
    name = check_name(name)
    store = ctx.datasets
    fingerprint = body_hash({"name": name, "sha256": sha256})
    with idempotent(ctx.idempotency, tenant=tenant, scope="datasets", key=idempotency_key,
                    fingerprint=fingerprint) as claim:
        if claim.replay is not None:
            try:
                return dataset_view(store.get_manifest(tenant, claim.replay["id"]))
            except DatasetNotFound:
                return claim.replay
        dataset = _parse_file(path, name=name, max_bytes=ctx.settings.max_dataset_bytes)
        check_examples(ctx.settings, len(dataset))
        check_storage_quota(ctx.settings, tenant=tenant, used=tenant_stored_bytes(ctx, tenant),
                            adding=path.stat().st_size)
        dataset_id = new_dataset_id()
        record = dataset_record(dataset, name=name, size=path.stat().st_size, sha256=sha256)
        view = dataset_view(store.publish(tenant=tenant, dataset_id=dataset_id, path=path,
                                          record=record))
        logger.info("dataset %s uploaded by tenant %s (%d examples)", dataset_id, tenant,
                    len(dataset))
        claim.value = view
        return view


def list_datasets(*, ctx: ServiceContext, tenant: str) -> list[dict[str, Any]]:
    return [dataset_view(m) for m in ctx.datasets.list_manifests(tenant)]


def get_dataset(*, ctx: ServiceContext, tenant: str, dataset_id: str) -> dict[str, Any]:
    return dataset_view(ctx.datasets.get_manifest(tenant, dataset_id))


def delete_dataset(*, ctx: ServiceContext, tenant: str, dataset_id: str) -> None:
    """A hard delete: the manifest, then the file's blob unless another manifest names the
    same bytes (409 `dataset_in_use` while a queued or running job reads it)."""
    with holding_items(ctx, tenant, [("datasets", dataset_id)]):
        ctx.datasets.get_manifest(tenant, dataset_id)  # 404 before 409
        check_not_in_use(ctx, tenant, "datasets", dataset_id)
        ctx.datasets.delete(tenant, dataset_id)


def load_dataset(*, ctx: ServiceContext, tenant: str, dataset_id: str, work: Path,
                 role: str) -> TextDataset:
    """A stored data set, parsed (it was validated on upload; parsing again is cheap)."""
    path = ctx.datasets.fetch(tenant, dataset_id, work / f"{role}.jsonl")
    return _parse_file(path, name=role, max_bytes=max(ctx.settings.max_dataset_bytes,
                                                      path.stat().st_size))
