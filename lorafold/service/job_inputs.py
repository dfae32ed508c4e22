"""Which stored adapters and data sets a job reads, and "still in use" for deletes.

A queued or running job reads its inputs through their manifests when it runs, so
deleting one of them would fail the job (or, with its blobs gone, break it half way). A
delete of an input of a live job is therefore refused (409 `adapter_in_use` /
`dataset_in_use`: cancel the job or wait). Submitting a job and deleting one of its inputs
take the same per-item lock, so either the delete sees the job, or the submission finds the
input gone (404) and no job is created.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from lorafold.errors import Conflict, JobNotFound

if TYPE_CHECKING:
    from lorafold.service.context import ServiceContext

Item = tuple[str, str]  # (kind: "adapters" | "datasets", item id)


def job_inputs(params: Mapping[str, Any]) -> set[Item]:
    """The stored items a job's params name (merges and plans: `inputs`, a tuned merge's
    validation sets too; unlearning: its adapter, forget adapter, constituents and data
    sets)."""
    adapters = {str(item["id"]) for item in params.get("inputs") or () if "id" in item}
    for name in ("adapter", "forget_adapter"):
        if params.get(name):
            adapters.add(str(params[name]))
    adapters.update(str(i) for i in params.get("constituents") or ())
    datasets = {str(i) for i in dict(params.get("datasets") or {}).values()}
    datasets.update(str(i) for i in dict(params.get("tune") or {}).get("datasets") or ())
    return {("adapters", i) for i in adapters} | {("datasets", i) for i in datasets}


def _lock_names(tenant: str, items: Iterable[Item]) -> list[str]:
    return [f"item:{kind}/{tenant}/{item_id}" for kind, item_id in items]


@contextlib.contextmanager
def holding_items(ctx: ServiceContext, tenant: str, items: Iterable[Item]) -> Iterator[None]:
    """Hold the locks of `items` (while a job naming them is created, or one is deleted)."""
    with ctx.locks.hold(_lock_names(tenant, items)):
        yield


def check_inputs_exist(ctx: ServiceContext, tenant: str, items: Iterable[Item]) -> None:
    """NotFound for an input deleted since the request was checked."""
    for kind, item_id in sorted(items):
        store = ctx.adapters if kind == "adapters" else ctx.datasets
        store.get_manifest(tenant, item_id)


def check_not_in_use(ctx: ServiceContext, tenant: str, kind: str, item_id: str) -> None:
    """Conflict if a queued or running job of the tenant reads the item."""
    for job_id in ctx.active_jobs.job_ids(tenant):
        try:
            record = ctx.jobs.get(job_id, tenant=tenant)
        except JobNotFound:
            continue
        if not record.status.is_terminal and (kind, item_id) in job_inputs(record.params):
            noun = kind.removesuffix("s")
            raise Conflict(f"{noun} {item_id} is an input of job {job_id} "
                           f"({record.status.value}); cancel the job or wait for it to finish",
                           code=f"{noun}_in_use", job_id=job_id)
