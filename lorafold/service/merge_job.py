"""The body of a merge job, as run by a worker: fetch, merge, publish, record the outcome.

Every state change is written by the job itself to its record (JobStore). The output
adapter's id is derived from the job id, so a retried job (its worker died) publishes
over the same id instead of creating a second adapter, and the manifest is written last,
so no partial adapter is ever listed. Cancellation is cooperative: the cancel flag is
checked between inputs and between modules (the merge executor's checkpoint).

Domain errors end the job as `failed` with {code, message, retryable}; they are not
re-raised, so the queue never re-runs a job that failed for a reason of its own.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafold.adapters import open_adapter
from lorafold.errors import Conflict, JobCancelled, LorafoldError
from lorafold.jobs import JobRecord
from lorafold.merge import merge_adapters
from lorafold.service.adapters import adapter_id_for_job, adapter_record, publish_adapter
from lorafold.service.context import ServiceContext
from lorafold.service.joblog import JobLogger, ProgressReporter, job_logger
from lorafold.service.merges import request_from_params

logger = logging.getLogger(__name__)

# Each stage's share of the whole job, for one progress fraction that only moves forward.
MERGE_STAGES = {"fetch": (0.0, 0.1), "plan": (0.1, 0.1), "merge": (0.1, 0.9),
                "write": (0.9, 0.95), "publish": (0.95, 1.0)}
SUPERSEDED = frozenset({"job_finished", "stale_attempt"})


def start_attempt(ctx: ServiceContext, job_id: str, log: JobLogger,
                  runner: str | None = None) -> JobRecord | None:
    """Mark the job running (a new attempt); None if it is already over (e.g. cancelled)."""
    try:
        record = ctx.jobs.mark_running(job_id)
    except Conflict as e:
        if e.code not in SUPERSEDED:
            raise
        log.info("not started: %s", e.message)
        return None
    if runner:
        ctx.jobs.log(job_id, f"attempt {record.attempts} started on {runner}")
    log.info("attempt %d started%s", record.attempts, f" on {runner}" if runner else "")
    return record


def settle(mark: Callable[[], JobRecord], log: JobLogger) -> JobRecord | None:
    """Write the final state; a superseded attempt (the job moved on) just stops."""
    try:
        return mark()
    except Conflict as e:
        if e.code not in SUPERSEDED:
            raise
        log.info("outcome not recorded: %s", e.message)
        return None


def run_merge_job(*, ctx: ServiceContext, job_id: str, device: str | None = None,
                  runner: str | None = None) -> JobRecord | None:
    """Run one attempt of merge job `job_id`; returns its final record (None if superseded)."""
    log = job_logger(logger, job_id)
    record = start_attempt(ctx, job_id, log, runner)
    if record is None:
        return None
    attempt = record.attempts
    try:
        ctx.jobs.checkpoint(job_id)
        with tempfile.TemporaryDirectory(prefix=f"{job_id}-", dir=ctx.spool_dir) as tmp:
            result = _merge_and_publish(ctx, record, Path(tmp), device, log)
    except JobCancelled:
        log.info("cancelled (attempt %d)", attempt)
        return settle(lambda: ctx.jobs.mark_cancelled(job_id, attempt=attempt), log)
    except LorafoldError as e:
        if isinstance(e, Conflict) and e.code in SUPERSEDED:
            log.info("stopped: %s", e.message)
            return None
        log.warning("failed: %s: %s", e.code, e.message)
        error = e.to_dict()
        return settle(lambda: ctx.jobs.mark_failed(job_id, error, attempt=attempt), log)
    log.info("succeeded: adapter %s", result["adapter_id"])
    return settle(lambda: ctx.jobs.mark_succeeded(job_id, result, attempt=attempt), log)


def _merge_and_publish(ctx: ServiceContext, record: JobRecord, work: Path,
                       device: str | None, log: JobLogger) -> dict[str, Any]:
    job_id, tenant, params = record.id, record.tenant, record.params
    request = request_from_params(params)
    input_ids = [item["id"] for item in params["inputs"]]
    progress = ProgressReporter(ctx.jobs, job_id, MERGE_STAGES)
    store = ctx.adapters

    def checkpoint() -> None:
        ctx.jobs.checkpoint(job_id)

    with contextlib.ExitStack() as stack:
        adapters = []
        for done, adapter_id in enumerate(input_ids):
            checkpoint()
            directory = store.fetch_files(tenant, adapter_id, work / "inputs" / adapter_id)
            adapters.append(stack.enter_context(open_adapter(directory, label=adapter_id)))
            progress("fetch", (done + 1) / len(input_ids))
        log.info("fetched %d inputs; merging (%s/%s)", len(adapters), request.method,
                 request.rule)
        result = merge_adapters(adapters, work / "output", request, device=device,
                                progress=progress, checkpoint=checkpoint,
                                lineage_extra={"input_ids": input_ids, "job_id": job_id})
    checkpoint()
    progress("publish", 0.0)
    output_id = adapter_id_for_job(job_id)
    with open_adapter(result.out_dir, label=output_id) as output:
        stored = adapter_record(output.summary(), name=params["name"], source="merge",
                                parents=input_ids, job_id=job_id)
    publish_adapter(store=store, tenant=tenant, adapter_id=output_id,
                    directory=result.out_dir, record=stored, work_dir=work)
    log.info("published adapter %s in %.2fs of merging", output_id, result.wall_time_s)
    return {
        "adapter_id": output_id,
        "report": {
            "inputs": result.report["inputs"],
            "module_count": len(result.report["modules"]),
            "output_rank": result.lineage["parameters"]["output_rank"],
            "merge_time_s": round(result.wall_time_s, 3),
        },
    }
