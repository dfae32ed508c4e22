"""The body of a merge job, as run by a worker: fetch, merge, publish (the attempt's
bookkeeping, running to succeeded/failed/cancelled, is `attempts.run_attempt`'s).

The output adapter's id is derived from the job id, so a retried job (its worker died)
publishes over the same id instead of creating a second adapter, and the manifest is
written last, so no partial adapter is ever listed. Cancellation is cooperative: the cancel flag is
checked between inputs and between modules (the merge executor's checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from lorafold.jobs import JobRecord
from lorafold.merge import MergeResult, merge_adapters
from lorafold.service.adapters import publish_job_output
from lorafold.service.attempts import JobWork, run_attempt
from lorafold.service.context import ServiceContext
from lorafold.service.joblog import JobLogger
from lorafold.service.merges import request_from_params
from lorafold.service.tuned_merges import run_tuned_merge

logger = logging.getLogger(__name__)

# Each stage's share of the whole job, for one progress fraction that only moves forward.
MERGE_STAGES = {"fetch": (0.0, 0.1), "plan": (0.1, 0.1), "merge": (0.1, 0.9),
                "write": (0.9, 0.95), "publish": (0.95, 1.0)}


def run_merge_job(*, ctx: ServiceContext, job_id: str, device: str | None = None,
                  runner: str | None = None) -> JobRecord | None:
    """Run one attempt of merge job `job_id`; returns its final record (None if superseded)."""
    return run_attempt(ctx, job_id, _merge_and_publish, device=device, stages=MERGE_STAGES,
                       runner=runner)


def _merge_and_publish(job: JobWork, log: JobLogger) -> dict[str, Any]:
    request = request_from_params(job.params)
    input_ids = [item["id"] for item in job.params["inputs"]]
    if "tune" in job.params:  # a tuned merge (lorafold.service.tuned_merges)
        result = run_tuned_merge(job, log, request).result
    else:
        with contextlib.ExitStack() as stack:
            adapters = job.open_inputs(stack)
            log.info("fetched %d inputs; merging (%s/%s)", len(adapters), request.method,
                     request.rule_name)
            result = merge_adapters(adapters, job.work / "output", request, device=job.device,
                                    progress=job.progress, checkpoint=job.checkpoint,
                                    lineage_extra={"input_ids": input_ids,
                                                   "job_id": job.record.id})
    job.checkpoint()
    job.progress("publish", 0.0)
    output_id = publish_job_output(job.ctx, job.record, result.out_dir, job.work,
                                   source="merge", parents=input_ids)
    log.info("published adapter %s in %.2fs of merging", output_id, result.wall_time_s)
    return {"adapter_id": output_id, "report": merge_summary(result)}


def merge_summary(result: MergeResult) -> dict[str, Any]:
    """The merge report as a job result shows it: per-input means, sizes, time. (The
    per-module report stays with the adapter, in lorafold.json.)"""
    summary = {
        "inputs": result.report["inputs"],
        "module_count": len(result.report["modules"]),
        "output_rank": result.lineage["parameters"]["output_rank"],
        "merge_time_s": round(result.wall_time_s, 3),
    }
    if "subspaces" in result.report:
        summary["subspaces"] = {k: v for k, v in result.report["subspaces"].items()
                                if k != "modules"}
    # rank "auto"'s choice, a target's preflight, a tuned merge's search
    for key in ("auto_rank", "serving", "tuning"):
        if key in result.report:
            summary[key] = result.report[key]
    return summary
