"""The body of an unlearning job, as run by a worker: fetch, unlearn, publish.

`remove` and `negate` are merges underneath (lorafold.unlearn.adapter_ops); the
data-driven methods train against the base model (lorafold.unlearn.unlearn). Either way
the output is published under the job's output id, manifest last, exactly like a merge's,
and the job's result carries what a caller needs to judge it: the merge report, or the
unlearning metrics (which also go into the adapter's lineage and metadata).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from lorafold.adapters import open_adapter
from lorafold.jobs import JobRecord
from lorafold.merge import MergeResult
from lorafold.service.adapters import publish_job_output
from lorafold.service.attempts import JobWork, run_attempt
from lorafold.service.context import ServiceContext
from lorafold.service.datasets import load_dataset
from lorafold.service.joblog import JobLogger
from lorafold.service.merge_job import MERGE_STAGES, merge_summary
from lorafold.service.unlearning import locate_base_model
from lorafold.unlearn import unlearn
from lorafold.unlearn.adapter_ops import negate_adapter, remove_constituents

logger = logging.getLogger(__name__)

UNLEARN_SPAN = (0.1, 0.95)  # the data-driven run's share of the job, between fetch and publish


def run_unlearn_job(*, ctx: ServiceContext, job_id: str, device: str | None = None,
                    runner: str | None = None) -> JobRecord | None:
    """Run one attempt of unlearning job `job_id`; its final record (None if superseded)."""
    return run_attempt(ctx, job_id, _unlearn_and_publish, device=device, stages=MERGE_STAGES,
                       runner=runner)


def _unlearn_and_publish(job: JobWork, log: JobLogger) -> dict[str, Any]:
    method = job.params["method"]
    body: Callable[[JobWork], tuple[list[str], dict[str, Any]]] = \
        {"remove": _remove, "negate": _negate}.get(method, _data_driven)
    log.info("unlearning (%s) from adapter %s", method, job.params["adapter"])
    parents, result = body(job)
    job.checkpoint()
    job.progress("publish", 0.0)
    metadata = {"unlearning": result.get("metrics")} if "metrics" in result else None
    output_id = publish_job_output(job.ctx, job.record, job.work / "output", job.work,
                                   source="unlearn", parents=parents, metadata=metadata)
    log.info("published adapter %s", output_id)
    return {"adapter_id": output_id, "method": method, **result}


def _remove(job: JobWork) -> tuple[list[str], dict[str, Any]]:
    merged = job.fetch(job.params["adapter"])
    constituents = job.params["constituents"]
    paths = {}
    for done, adapter_id in enumerate(constituents):
        paths[adapter_id] = job.fetch(adapter_id)
        job.progress("fetch", (done + 1) / len(constituents))
    result = remove_constituents(merged, job.params["remove"], job.work / "output",
                                 resolve=lambda entry: paths[entry["label"]],
                                 device=job.device, progress=job.progress,
                                 checkpoint=job.checkpoint)
    return [job.params["adapter"]], {"removed": job.params["remove"],
                                     "constituents": constituents,
                                     "report": merge_summary(result)}


def _negate(job: JobWork) -> tuple[list[str], dict[str, Any]]:
    ids = [job.params["adapter"], job.params["forget_adapter"]]
    with contextlib.ExitStack() as stack:
        target, forget = (stack.enter_context(open_adapter(job.fetch(i), label=i)) for i in ids)
        job.progress("fetch", 1.0)
        result: MergeResult = negate_adapter(
            target, forget, job.work / "output", strength=job.params["strength"],
            rank=job.params.get("rank"), device=job.device, progress=job.progress,
            checkpoint=job.checkpoint)
    return ids, {"strength": job.params["strength"], "report": merge_summary(result)}


def _data_driven(job: JobWork) -> tuple[list[str], dict[str, Any]]:
    params, ctx = job.params, job.ctx
    model_dir = locate_base_model(ctx.settings, params["base_model"],
                                  allow_download=ctx.settings.allow_model_download)
    adapter_dir = job.fetch(params["adapter"])
    sets = {role: load_dataset(ctx=ctx, tenant=job.record.tenant, dataset_id=dataset_id,
                               work=job.work / "datasets", role=role)
            for role, dataset_id in params["datasets"].items()}
    job.progress("fetch", 1.0)
    result = unlearn(
        base_model_dir=model_dir, adapter_dir=adapter_dir, forget=sets["forget"],
        retain=sets.get("retain"), holdout=sets.get("holdout"), method=params["method"],
        out_dir=job.work / "output", hyperparams=params["hyperparams"], device=job.device,
        progress=lambda stage, fraction: job.progress.nested(stage, fraction,
                                                             within=UNLEARN_SPAN),
        checkpoint=job.checkpoint,
        lineage_extra={"job_id": job.record.id, "adapter_id": params["adapter"],
                       "dataset_ids": params["datasets"]})
    return [params["adapter"]], {"base_model": params["base_model"], "metrics": result.metrics}

