"""Logging and progress helpers shared by job bodies: the job id is in every line.

Job code logs through `job_logger` (message prefixed `job <id>:`). Workers also install
`JobIdFilter` on their log handler, so that every record emitted while a job runs —
including those of the core library, storage, RQ — carries `job_id` in its format.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any

from lorafold.jobs import JobStore

_current_job: ContextVar[str] = ContextVar("lorafold_job_id", default="-")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(job_id)s]: %(message)s"


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Mark the code inside as working on `job_id` (for `JobIdFilter`)."""
    token = _current_job.set(job_id)
    try:
        yield
    finally:
        _current_job.reset(token)


class JobIdFilter(logging.Filter):
    """Adds `record.job_id`: the job being worked on, or '-'."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = _current_job.get()
        return True


def configure_worker_logging(level: str) -> None:
    """Root handler with the job id in every line (worker processes)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(JobIdFilter())



class JobLogger(logging.LoggerAdapter):
    """Prefixes every message with `job <id>:` so each line can be traced to its job."""

    def process(self, msg: Any,
                kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        return f"job {extra.get('job_id')}: {msg}", kwargs


def job_logger(logger: logging.Logger, job_id: str) -> JobLogger:
    return JobLogger(logger, {"job_id": job_id})


class ProgressReporter:
    """Maps a stage's own fraction onto the whole job's [0, 1] and stores it.

    `stages` gives each stage its (start, end) share of the job, so a client's progress
    bar moves forward through fetch → merge → publish instead of restarting per stage.
    """

    def __init__(self, jobs: JobStore, job_id: str,
                 stages: Mapping[str, tuple[float, float]], *,
                 attempt: int | None = None) -> None:
        self._jobs = jobs
        self._job_id = job_id
        self._stages = stages
        self._attempt = attempt  # fences progress off a superseded attempt
        self._last = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        start, end = self._stages.get(stage, (self._last, self._last))
        self.nested(stage, fraction, within=(start, end))

    def nested(self, stage: str, fraction: float, *, within: tuple[float, float]) -> None:
        """Progress of a callee that reports its own overall fraction (e.g. `unlearn`),
        mapped onto the part `within` of the job; `stage` is shown as it is."""
        start, end = within
        overall = start + (end - start) * min(max(fraction, 0.0), 1.0)
        self._last = max(self._last, overall)
        self._jobs.set_progress(self._job_id, stage, self._last, attempt=self._attempt)
