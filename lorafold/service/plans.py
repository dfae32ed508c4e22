"""Submitting a consolidation plan: options and inputs checked before a job exists.

A plan reads every module of every input (lorafold.merge.grouping), so it runs as a job
on a worker like a merge; its result is the plan itself (groups, ranks, per-member
energies, parameters before and after), and nothing is published.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lorafold.errors import InvalidRequest
from lorafold.jobs import JobRecord, JobType, body_hash
from lorafold.merge.grouping import DEFAULT_MIN_SIMILARITY, check_plan_options
from lorafold.merge.options import DEFAULT_MIN_ENERGY
from lorafold.service.context import ServiceContext
from lorafold.service.idempotency import idempotent
from lorafold.service.jobs import submit_job
from lorafold.service.merges import check_base_models

MAX_PLAN_INPUTS = 64

PLAN_OPTION_DEFAULTS: Mapping[str, Any] = {
    "rank": None, "min_energy": DEFAULT_MIN_ENERGY, "max_rank": None, "max_groups": None,
    "min_similarity": DEFAULT_MIN_SIMILARITY, "force": False}


def plan_options(given: Mapping[str, Any]) -> dict[str, Any]:
    """The plan's options with their defaults, checked (rank None: auto per group)."""
    options = {**PLAN_OPTION_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    check_plan_options(options["rank"], options["min_energy"], options["max_rank"],
                       options["max_groups"], options["min_similarity"])
    return options


def create_plan(*, ctx: ServiceContext, tenant: str, adapter_ids: Sequence[str],
                options: Mapping[str, Any], idempotency_key: str | None = None,
                webhook_url: str | None = None) -> JobRecord:
    """A queued plan job, or the job a previous identical request created."""
    resolved = plan_options(options)
    if not 2 <= len(adapter_ids) <= MAX_PLAN_INPUTS:
        raise InvalidRequest(f"a plan takes 2 to {MAX_PLAN_INPUTS} adapters, got "
                             f"{len(adapter_ids)}", code="too_few_inputs"
                             if len(adapter_ids) < 2 else "invalid_parameter")
    fingerprint = body_hash({"adapters": list(adapter_ids), "options": resolved,
                             "webhook_url": webhook_url})
    with idempotent(ctx.idempotency, tenant=tenant, scope="plans", key=idempotency_key,
                    fingerprint=fingerprint) as claim:
        if claim.replay is not None:
            return ctx.jobs.get(claim.replay["job_id"], tenant=tenant)
        manifests = [ctx.adapters.get_manifest(tenant, adapter_id) for adapter_id in adapter_ids]
        check_base_models(manifests, resolved["force"])
        params = {"inputs": [{"id": adapter_id, "sha256": m["record"]["sha256"]}
                             for adapter_id, m in zip(adapter_ids, manifests, strict=True)],
                  "options": resolved}
        record = submit_job(ctx=ctx, tenant=tenant, job_type=JobType.PLAN, params=params,
                            webhook_url=webhook_url)
        claim.value = {"job_id": record.id}
        return record
