"""Job records, states, events and idempotency keys, kept in Redis under our own keys."""

from lorafold.jobs.idempotency import IdempotencyStore, body_hash
from lorafold.jobs.models import (
    TERMINAL_STATUSES,
    TRANSITIONS,
    JobRecord,
    JobStatus,
    JobType,
    Progress,
    can_transition,
)
from lorafold.jobs.store import JobPage, JobStore

__all__ = [
    "TERMINAL_STATUSES",
    "TRANSITIONS",
    "IdempotencyStore",
    "JobPage",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "JobType",
    "Progress",
    "body_hash",
    "can_transition",
]
