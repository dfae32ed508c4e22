"""One attempt of a job, as run by a worker: the part every job type shares.

`run_attempt` marks the job running (a new attempt), runs its body with a `JobWork` (a
private work directory under the spool, progress, the cancel checkpoint, input fetching),
and writes the outcome to the job's record: `succeeded` with
the body's result, `failed` with {code, message, retryable} for a domain error, or
`cancelled` when the body saw the cancel flag at a checkpoint. Domain errors are not
re-raised, so the queue never re-runs a job that failed for a reason of its own. An
attempt that finds its job already over, or superseded by a newer attempt, just stops.

Every write of an attempt is fenced by its attempt number — checkpoints, progress, the
final state, and a worker's own failure record (`current_attempt`) — so a superseded
attempt (a worker wrongly declared dead) can neither fail nor overwrite the live one's
job. Its work directory (lorafold.service.workdirs) is locked while it runs; each new
attempt first sweeps the directories of attempts that died.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from lorafold.adapters import LoraAdapter, open_adapter
from lorafold.adapters.source import WEIGHTS_NAME
from lorafold.errors import Conflict, JobCancelled, LorafoldError
from lorafold.jobs import JobRecord
from lorafold.service.context import ServiceContext
from lorafold.service.joblog import JobLogger, ProgressReporter, job_logger
from lorafold.service.webhooks import deliver
from lorafold.service.workdirs import attempt_dir, sweep_work_dirs

logger = logging.getLogger(__name__)

SUPERSEDED = frozenset({"job_finished", "stale_attempt"})
# The attempt this process is running, for writes made outside `run_attempt` (a worker
# recording a timeout or a crash): None when no attempt has started.
current_attempt: ContextVar[int | None] = ContextVar("lorafold_attempt", default=None)


class JobWork:
    """What a job body works with: its record and params, a private work directory, the
    device, progress over the job's `stages`, the cancel checkpoint, and input fetching."""

    def __init__(self, ctx: ServiceContext, record: JobRecord, work: Path, device: str | None,
                 stages: Mapping[str, tuple[float, float]]) -> None:
        self.ctx = ctx
        self.record = record
        self.params = record.params
        self.work = work
        self.device = device
        self.progress = ProgressReporter(ctx.jobs, record.id, stages,
                                         attempt=record.attempts)

    def checkpoint(self) -> None:
        """Raises JobCancelled once the job's cancellation was requested, and
        Conflict(stale_attempt) once a newer attempt of it started."""
        self.ctx.jobs.checkpoint(self.record.id, attempt=self.record.attempts)

    def fetch(self, adapter_id: str) -> Path:
        """One of the tenant's adapters, downloaded into the work directory."""
        return self.fetch_verified(adapter_id)[0]

    def fetch_verified(self, adapter_id: str) -> tuple[Path, dict[str, str]]:
        """`fetch`, plus each file's sha256 as the download checked it."""
        self.checkpoint()
        return self.ctx.adapters.fetch_verified(self.record.tenant, adapter_id,
                                                self.work / "inputs" / adapter_id)

    def open_inputs(self, stack: contextlib.ExitStack) -> list[LoraAdapter]:
        """The job's `inputs` (params), fetched and opened in order (labelled by their ids,
        closed with `stack`), reporting stage "fetch" as they come."""
        input_ids = [item["id"] for item in self.params["inputs"]]
        adapters = []
        for done, adapter_id in enumerate(input_ids):
            directory, digests = self.fetch_verified(adapter_id)
            adapters.append(stack.enter_context(open_adapter(  # verified: not hashed again
                directory, label=adapter_id, sha256=digests.get(WEIGHTS_NAME))))
            self.progress("fetch", (done + 1) / len(input_ids))
        return adapters


JobBody = Callable[[JobWork, JobLogger], dict[str, Any]]


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


def settle(mark: Callable[[], JobRecord], log: JobLogger,
           ctx: ServiceContext | None = None) -> JobRecord | None:
    """Write the final state, then report it to the job's webhook; a superseded attempt
    (the job moved on) just stops."""
    try:
        record = mark()
    except Conflict as e:
        if e.code not in SUPERSEDED:
            raise
        log.info("outcome not recorded: %s", e.message)
        return None
    if ctx is not None:
        notify(ctx, record)
    return record


def notify(ctx: ServiceContext, record: JobRecord) -> None:
    """Deliver a finished job's webhook, if it has one; each try is a line in its events."""
    deliver(ctx.settings, record, log=lambda message: ctx.jobs.log(record.id, message))


def run_attempt(ctx: ServiceContext, job_id: str, body: JobBody, *, device: str | None,
                stages: Mapping[str, tuple[float, float]],
                runner: str | None = None) -> JobRecord | None:
    """Run one attempt of job `job_id`; returns its final record (None if superseded)."""
    log = job_logger(logger, job_id)
    sweep_work_dirs(ctx.spool_dir)
    record = start_attempt(ctx, job_id, log, runner)
    if record is None:
        return None
    attempt = record.attempts
    current_attempt.set(attempt)
    try:
        ctx.jobs.checkpoint(job_id, attempt=attempt)
        with attempt_dir(ctx.spool_dir, job_id) as work:
            result = body(JobWork(ctx, record, work, device, stages), log)
    except JobCancelled:
        log.info("cancelled (attempt %d)", attempt)
        return settle(lambda: ctx.jobs.mark_cancelled(job_id, attempt=attempt), log, ctx)
    except LorafoldError as e:
        if isinstance(e, Conflict) and e.code in SUPERSEDED:
            log.info("stopped: %s", e.message)
            return None
        log.warning("failed: %s: %s", e.code, e.message)
        error = e.to_dict()
        return settle(lambda: ctx.jobs.mark_failed(job_id, error, attempt=attempt), log, ctx)
    log.info("succeeded: adapter %s", result.get("adapter_id"))
    return settle(lambda: ctx.jobs.mark_succeeded(job_id, result, attempt=attempt), log, ctx)
