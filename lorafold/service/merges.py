"""Submitting a merge: everything checkable without tensors is checked before a job exists.

`create_merge` validates the parameters with the core's `check_request`, resolves the
input ids within the tenant (another tenant's id is simply not found), refuses inputs of
different base models unless forced, then creates the job record and enqueues it. A
request that would fail for these reasons answers 4xx at once instead of a failed job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from lorafold.errors import IncompatibleAdapters
from lorafold.jobs import JobRecord, JobType, body_hash
from lorafold.merge import MergeRequest, check_request
from lorafold.service.adapters import check_name
from lorafold.service.context import ServiceContext
from lorafold.service.idempotency import idempotent
from lorafold.service.jobs import submit_job
from lorafold.service.tuned_merges import TuneSpec, plan_tune


def merge_params(adapter_ids: Sequence[str], request: MergeRequest, name: str,
                 manifests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the job record keeps: enough for the job to run and for a user to read."""
    weights = request.weights or (1.0,) * len(adapter_ids)
    return {
        "name": name,
        "inputs": [{"id": adapter_id, "weight": float(weight), "sha256": m["record"]["sha256"]}
                   for adapter_id, weight, m in zip(adapter_ids, weights, manifests,
                                                    strict=True)],
        "request": {**asdict(request), "rule": request.rule_name, "weights": list(weights)},
    }


def request_from_params(params: dict[str, Any]) -> MergeRequest:
    """Inverse of `merge_params` for the job body. A job queued before `beta` replaced
    `balance` still runs: `balance: true` meant β = 0."""
    fields = dict(params["request"])
    fields["weights"] = tuple(fields["weights"])
    if fields.pop("balance", False) and fields.get("beta") is None:
        fields["beta"] = 0.0
    return MergeRequest(**fields)


def check_base_models(manifests: Sequence[dict[str, Any]], force: bool) -> None:
    names = {m["record"].get("base_model") for m in manifests} - {None, ""}
    if len(names) > 1 and not force:
        raise IncompatibleAdapters(
            f"inputs were trained on different base models ({', '.join(sorted(names))}); "
            "pass force to merge them anyway", code="base_model_mismatch")


def create_merge(*, ctx: ServiceContext, tenant: str, adapter_ids: Sequence[str],
                 request: MergeRequest, name: str | None = None,
                 idempotency_key: str | None = None,
                 webhook_url: str | None = None, tune: TuneSpec | None = None) -> JobRecord:
    """A queued merge job, or the job a previous identical request created; with `tune`,
    a tuned merge (lorafold.service.tuned_merges), refused here if it cannot run."""
    name = check_name(name or f"merge of {len(adapter_ids)} adapters")
    fingerprint = body_hash({"adapters": list(adapter_ids), "request": asdict(request),
                             "name": name, "webhook_url": webhook_url,
                             **({"tune": asdict(tune)} if tune is not None else {})})
    with idempotent(ctx.idempotency, tenant=tenant, scope="merges", key=idempotency_key,
                    fingerprint=fingerprint) as claim:
        if claim.replay is not None:
            return ctx.jobs.get(claim.replay["job_id"], tenant=tenant)
        check_request(request, len(adapter_ids))
        store = ctx.adapters
        manifests = [store.get_manifest(tenant, adapter_id) for adapter_id in adapter_ids]
        check_base_models(manifests, request.force)
        params = merge_params(adapter_ids, request, name, manifests)
        if tune is not None:
            params["tune"] = plan_tune(ctx, tenant, tune, request, manifests)
        record = submit_job(ctx=ctx, tenant=tenant, job_type=JobType.MERGE, params=params,
                            webhook_url=webhook_url)
        claim.value = {"job_id": record.id}
        return record

