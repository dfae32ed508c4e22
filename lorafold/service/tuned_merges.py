"""Tuned merges in the service: checked before queuing, run by the merge job's worker.

`plan_tune` refuses, before any job exists, what would only fail later: unknown or
inapplicable parameters, a budget over the tenant's bound, a time limit over the service's,
the wrong number of validation sets, a data set that does not exist or holds no records, a
base model that is not available, and inputs whose modules do not fit that base model's
architecture (checked from the adapters' headers on the meta device, as for unlearning).
`run_tuned_merge` is the job body: fetch inputs and sets, `lorafold.tune.tune_merge`,
publish; the result carries the chosen values, the candidates, the validation curve and
the wall time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorafold.errors import InvalidDataset, InvalidRequest
from lorafold.merge.plan import MergeRequest, check_request
from lorafold.service.attempts import JobWork
from lorafold.service.context import ServiceContext
from lorafold.service.datasets import load_dataset
from lorafold.service.joblog import JobLogger
from lorafold.service.unlearning import check_fits_base_model, locate_base_model
from lorafold.tune.options import TuneRequest, check_tune_request, resolve_params

if TYPE_CHECKING:
    from lorafold.tune.api import TunedMerge

logger = logging.getLogger(__name__)

TUNE_SPAN = (0.1, 0.95)  # the tuned merge's share of the job, between fetch and publish


@dataclass(frozen=True)
class TuneSpec:
    """`tune` of POST /v1/merges, as received."""

    datasets: tuple[str, ...]
    base_model: str | None = None
    params: tuple[str, ...] | None = None
    budget: int | None = None
    time_limit_s: float | None = None

    def request(self) -> TuneRequest:
        defaults = TuneRequest()
        return TuneRequest(params=self.params,
                           budget=defaults.budget if self.budget is None else self.budget,
                           time_limit_s=defaults.time_limit_s if self.time_limit_s is None
                           else self.time_limit_s)


def _base_model_name(spec: TuneSpec, manifests: Sequence[Mapping[str, Any]]) -> str:
    if spec.base_model:
        return spec.base_model
    names = sorted({str(m["record"].get("base_model")) for m in manifests
                    if m["record"].get("base_model")})
    if len(names) != 1:
        raise InvalidRequest("the inputs name no single base model; pass tune.base_model",
                             code="base_model_required")
    return names[0]


def plan_tune(ctx: ServiceContext, tenant: str, spec: TuneSpec, request: MergeRequest,
              manifests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The job's `tune` params, once everything checkable without tensors has passed."""
    tune = spec.request()
    method, rule, _, _ = check_request(request, len(manifests))
    check_tune_request(tune, n_inputs=len(manifests), n_datasets=len(spec.datasets),
                       max_budget=ctx.settings.tune_budget_for(tenant))
    if tune.time_limit_s > ctx.settings.max_tune_time_s:
        raise InvalidRequest(f"tune time_limit_s {tune.time_limit_s:g} is over this "
                             f"service's bound of {ctx.settings.max_tune_time_s:g} s",
                             code="tune_time_limit_exceeded")
    if request.min_energy is not None:
        raise InvalidRequest("a tuned merge needs an explicit rank (not rank auto)",
                             code="invalid_tune")
    params = resolve_params(tune, method.name, rule.name, uses_density=rule.uses_density,
                            uses_drop=rule.uses_drop)
    for dataset_id in spec.datasets:
        record = ctx.datasets.get_manifest(tenant, dataset_id)["record"]
        if not record.get("examples"):
            raise InvalidDataset(f"data set {dataset_id} holds no records",
                                 code="empty_dataset")
    base_name = _base_model_name(spec, manifests)
    check_fits_base_model(ctx, base_name, manifests)
    return {"datasets": list(spec.datasets), "base_model": base_name,
            "request": {**tune.to_dict(), "params": list(params)}}


def tune_from_params(params: Mapping[str, Any]) -> TuneRequest:
    fields = dict(params["request"])
    fields["params"] = tuple(fields["params"]) if fields.get("params") is not None else None
    return TuneRequest(**fields)


def run_tuned_merge(job: JobWork, log: JobLogger, request: MergeRequest) -> TunedMerge:
    """Fetch the inputs and sets, tune, write into the job's work dir (publish is the
    merge job's)."""
    from lorafold.tune.api import tune_merge

    ctx, tune_params = job.ctx, job.params["tune"]
    model_dir = locate_base_model(ctx.settings, tune_params["base_model"],
                                  allow_download=ctx.settings.allow_model_download)
    input_ids = [item["id"] for item in job.params["inputs"]]
    with contextlib.ExitStack() as stack:
        adapters = job.open_inputs(stack)
        sets = [load_dataset(ctx=ctx, tenant=job.record.tenant, dataset_id=dataset_id,
                             work=job.work / "datasets", role=f"val{i}")
                for i, dataset_id in enumerate(tune_params["datasets"])]
        log.info("tuning %s over %d inputs on %d validation sets", request.method,
                 len(adapters), len(sets))
        tuned = tune_merge(
            adapters, job.work / "output", request, tune_from_params(tune_params),
            datasets=sets, base_model_dir=model_dir, device=job.device,
            progress=lambda stage, fraction: job.progress.nested(stage, fraction,
                                                                 within=TUNE_SPAN),
            checkpoint=job.checkpoint, max_budget=ctx.settings.tune_budget_for(
                job.record.tenant),
            lineage_extra={"input_ids": input_ids, "job_id": job.record.id,
                           "dataset_ids": list(tune_params["datasets"])})
    log.info("tuned: %d candidates, chosen %s", tuned.tuning["candidates_evaluated"],
             tuned.tuning["chosen"])
    return tuned
