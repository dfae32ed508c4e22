"""RQ entry points. Thin: each calls one `lorafold.service` function and makes sure the
job's record ends in a final state whatever happens inside.

`configure()` is called once by the worker process before it starts working; the work
horses RQ forks for each job inherit that context. RQ callbacks (`on_job_failure`,
`on_work_horse_killed`) run when a job was lost — its horse killed, or its worker gone
silent — and record what happened; RQ then re-queues the job while retries are left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from redis import Redis
from rq.job import Job
from rq.timeouts import JobTimeoutException

from lorafold.errors import Conflict, JobNotFound
from lorafold.jobs import JobRecord, JobType
from lorafold.service.attempts import current_attempt, notify
from lorafold.service.context import ServiceContext
from lorafold.service.joblog import job_context, job_logger
from lorafold.service.merge_job import run_merge_job
from lorafold.service.plan_job import run_plan_job
from lorafold.service.unlearn_job import run_unlearn_job
from lorafold.settings import Settings

logger = logging.getLogger(__name__)

JobRunner = Callable[..., JobRecord | None]

_state: dict[str, Any] = {"context": None, "runner": None}


def configure(ctx: ServiceContext, *, runner: str | None = None) -> None:
    _state["context"] = ctx
    _state["runner"] = runner


def context() -> ServiceContext:
    """The worker's context (built from the environment if `configure` was not called)."""
    if _state["context"] is None:
        _state["context"] = ServiceContext(Settings())
    ctx: ServiceContext = _state["context"]
    return ctx


def _device(settings: Settings) -> str | None:
    return None if settings.worker_device == "auto" else settings.worker_device


def _apply_threads(settings: Settings) -> None:
    if settings.worker_threads:
        import torch

        torch.set_num_threads(settings.worker_threads)


def _free_memory() -> None:
    """Give cached GPU memory back. The work horse exits after the job anyway, which frees
    everything; this matters when a job runs in a long-lived process (SimpleWorker)."""
    import torch

    if torch.cuda.is_initialized():  # never initialises CUDA itself
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def fail_job(ctx: ServiceContext, job_id: str, error: Mapping[str, Any], *,
             attempt: int | None = None) -> None:
    """Record a final failure unless the job already reached a final state, or (given
    `attempt`) a newer attempt than the one that failed is running it."""
    try:
        notify(ctx, ctx.jobs.mark_failed(job_id, error, attempt=attempt))
    except (Conflict, JobNotFound) as e:
        job_logger(logger, job_id).info("failure not recorded: %s", e.message)


def run_merge(job_id: str) -> None:
    _run(job_id, JobType.MERGE, run_merge_job)


def run_unlearn(job_id: str) -> None:
    _run(job_id, JobType.UNLEARN, run_unlearn_job)


def run_plan(job_id: str) -> None:
    _run(job_id, JobType.PLAN, run_plan_job)


def _run(job_id: str, job_type: JobType, body: JobRunner) -> None:
    """Run `body` for the job, making sure a timeout or a crash still ends its record."""
    with job_context(job_id):
        ctx = context()
        log = job_logger(logger, job_id)
        _apply_threads(ctx.settings)
        token = current_attempt.set(None)  # set by run_attempt once it starts one
        try:
            body(ctx=ctx, job_id=job_id, device=_device(ctx.settings), runner=_state["runner"])
        except JobTimeoutException as e:
            log.error("timed out: %s", e)
            fail_job(ctx, job_id, {"code": "job_timeout", "retryable": True,
                                   "message": f"the job ran past its timeout of "
                                              f"{ctx.settings.job_timeout_s(job_type.value)}s"},
                     attempt=current_attempt.get())
        except Exception as e:  # a bug or a broken environment: record it, never leave it
            log.exception("crashed")
            fail_job(ctx, job_id, {"code": "internal_error", "retryable": False,
                                   "message": f"{type(e).__name__}: {e}"},
                     attempt=current_attempt.get())
        finally:
            current_attempt.reset(token)
            _free_memory()


def _job_lost(job: Job, reason: str) -> None:
    """The job's process died under it: note it, and fail the job if RQ will not retry."""
    with job_context(job.id):
        _record_loss(job, reason)


def _record_loss(job: Job, reason: str) -> None:
    ctx = context()
    log = job_logger(logger, job.id)
    retries_left = int(job.retries_left or 0)
    try:
        if retries_left > 0:
            log.warning("%s; RQ will retry it (%d retries left)", reason, retries_left)
            ctx.jobs.log(job.id, f"{reason}; retrying ({retries_left} retries left)")
            return
        log.error("%s; no retries left", reason)
        fail_job(ctx, job.id, {"code": "worker_lost", "retryable": True,
                               "message": f"{reason} and no retries are left"})
    except JobNotFound:
        log.warning("%s, but it has no job record", reason)


def on_job_failure(job: Job, connection: Redis, exc_type: type[BaseException] | None,
                   exc_value: BaseException | None, tb: TracebackType | None) -> None:
    """RQ failure callback: for us, only abandoned jobs (the tasks record their own errors)."""
    name = exc_type.__name__ if exc_type is not None else "unknown error"
    _job_lost(job, f"job abandoned by its worker ({name})")


def on_work_horse_killed(job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
    """RQ worker hook: the process running the job died (e.g. the OOM killer)."""
    _job_lost(job, f"the work horse (pid {retpid}) died with status {ret_val}")
