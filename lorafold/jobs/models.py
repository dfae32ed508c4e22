"""Job records, statuses and the one table of legal status transitions.

The record is plain data with a JSON round trip (`to_dict` / `from_dict`); how it is laid
out in Redis is the store's business. Timestamps are ISO-8601 UTC strings so that the
record reads the same in Redis, in JSON responses and in logs.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from lorafold.errors import Conflict


class JobStatus(str, Enum):
    """Where a job is in its life: queued → running → succeeded | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


class JobType(str, Enum):
    MERGE = "merge"
    UNLEARN = "unlearn"
    PLAN = "plan"


TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
)

# The only place that says which status may follow which. running → running is a retry
# of an attempt whose worker died; queued → failed covers jobs that cannot even start.
TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    return target in TRANSITIONS[current]


def allowed_sources(target: JobStatus) -> frozenset[JobStatus]:
    """The statuses a job may be in for a move to `target` (fed to the Lua scripts)."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


def transition_error(job_id: str, current: JobStatus, target: JobStatus) -> Conflict:
    """The Conflict for an illegal move; `job_finished` tells a worker to stop quietly."""
    code = "job_finished" if current.is_terminal else "invalid_transition"
    return Conflict(
        f"job {job_id} is {current.value}; it cannot become {target.value}",
        code=code, job_id=job_id, status=current.value, target=target.value,
    )


def check_transition(job_id: str, current: JobStatus, target: JobStatus) -> None:
    if not can_transition(current, target):
        raise transition_error(job_id, current, target)


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    """ISO-8601 in UTC with a trailing Z, microsecond precision (sorts as text)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Progress:
    """How far a running job is: a stage name and a fraction of the whole in [0, 1]."""

    stage: str
    fraction: float = 0.0

    def __post_init__(self) -> None:
        if not self.stage:
            raise ValueError("progress stage must be a non-empty string")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"progress fraction must be in [0, 1], got {self.fraction!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "fraction": float(self.fraction)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Progress:
        return cls(stage=str(data["stage"]), fraction=float(data["fraction"]))


def normalise_error(error: Mapping[str, Any]) -> dict[str, Any]:
    """An error payload in the one shape the API shows: {code, message, retryable}."""
    try:
        return {
            "code": str(error["code"]),
            "message": str(error["message"]),
            "retryable": bool(error.get("retryable", False)),
        }
    except KeyError as e:
        raise ValueError(f"job error needs 'code' and 'message', missing {e}") from e


@dataclass
class JobRecord:
    """Everything we know about one job; our source of truth, not RQ's job hash."""

    id: str
    tenant: str
    type: JobType
    status: JobStatus
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    progress: Progress = field(default_factory=lambda: Progress("queued", 0.0))
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    cancel_requested: bool = False

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: enums as their values, progress as a dict."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "type": self.type.value,
            "status": self.status.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "params": self.params,
            "progress": self.progress.to_dict(),
            "result": self.result,
            "error": self.error,
            "attempts": self.attempts,
            "cancel_requested": self.cancel_requested,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobRecord:
        """Inverse of `to_dict`; unknown keys are ignored so old readers survive new fields."""
        try:
            return cls(
                id=str(data["id"]),
                tenant=str(data["tenant"]),
                type=JobType(data["type"]),
                status=JobStatus(data["status"]),
                created_at=str(data["created_at"]),
                started_at=data.get("started_at"),
                finished_at=data.get("finished_at"),
                params=dict(data.get("params") or {}),
                progress=Progress.from_dict(data.get("progress") or {"stage": "queued",
                                                                     "fraction": 0.0}),
                result=data.get("result"),
                error=data.get("error"),
                attempts=int(data.get("attempts", 0)),
                cancel_requested=bool(data.get("cancel_requested", False)),
            )
        except KeyError as e:
            raise ValueError(f"job record is missing field {e}") from e
