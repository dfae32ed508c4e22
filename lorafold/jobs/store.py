"""Job records in Redis under our own keys: the source of truth for job state.

RQ's own job hashes expire and pickle by default, so the API and the CLI never read them;
they read what this store writes at every state change. Layout (prefix `lorafold:`):

- `job:<id>`            hash, one JSON value per record field (+ `event_seq` counter)
- `job:<id>:events`     stream capped at `max_events`, entry id `<seq>-0`, field `event`
- `tenant:<t>:jobs`     sorted set of job ids scored by creation time (listing)

Every state change is one Lua script (see `scripts.py`), so two workers racing on a
retried job see one consistent record. Another tenant's job answers exactly like a
missing one (`JobNotFound`).

Cancelling: a queued job becomes `cancelled` at once; a running job gets its cancel flag
set and stops at its next `checkpoint`; cancelling a cancelled job returns it unchanged;
cancelling a succeeded or failed job raises `Conflict(code="job_finished")`.
"""

from __future__ import annotations

import builtins
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from redis import Redis

from lorafold.errors import Conflict, InvalidRequest, JobCancelled, JobNotFound
from lorafold.jobs import scripts
from lorafold.jobs.models import (
    TERMINAL_STATUSES,
    JobRecord,
    JobStatus,
    JobType,
    Progress,
    allowed_sources,
    iso,
    new_job_id,
    normalise_error,
    transition_error,
    utc_now,
)

logger = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_RECORD_FIELDS = frozenset(JobRecord.__dataclass_fields__)
MAX_LIST_LIMIT = 500
# Event seqs are the first half of Redis stream ids (64-bit unsigned); `since + 1` must stay
# one, so larger values are refused here rather than by Redis.
MAX_EVENT_SEQ = 2**63


@dataclass(frozen=True)
class JobPage:
    """One page of a listing; pass `next_cursor` back to get the next (None: no more)."""

    items: list[JobRecord]
    next_cursor: str | None


def _dumps(value: Any) -> str:
    # allow_nan=False: NaN is not JSON, and a reader in another language would choke on it.
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _texts(reply: Any) -> Any:
    """A Lua reply with bytes turned into str, whatever `decode_responses` the client has."""
    if isinstance(reply, list):
        return [_texts(item) for item in reply]
    if isinstance(reply, bytes):
        return reply.decode()
    return reply


def _record(job_id: str, fields: Mapping[str, str]) -> JobRecord:
    data = {name: json.loads(raw) for name, raw in fields.items() if name in _RECORD_FIELDS}
    try:
        return JobRecord.from_dict(data)
    except ValueError as e:
        raise ValueError(f"job {job_id}: stored record is unreadable: {e}") from e


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))



def _stale(job_id: str, current: str, attempt: int | None) -> Conflict:
    return Conflict(f"job {job_id} is on attempt {current}, not {attempt}; this attempt was "
                    "superseded", code="stale_attempt", job_id=job_id, attempt=attempt)

class JobStore:
    """Create, read, list and move jobs through their states; append their events."""

    def __init__(self, redis: Redis, *, prefix: str = "lorafold:", max_events: int = 1000,
                 clock: Callable[[], datetime] = utc_now, retention_s: int = 0) -> None:
        self._redis = redis
        self._prefix = prefix
        self._max_events = max_events
        self._clock = clock
        # A finished job's record and events expire this long after it ended (0: never), so
        # Redis does not grow without bound; listings drop the index entries they outlive.
        self._retention_s = retention_s
        self._create = redis.register_script(scripts.CREATE)
        self._transition = redis.register_script(scripts.TRANSITION)
        self._progress = redis.register_script(scripts.PROGRESS)
        self._cancel = redis.register_script(scripts.REQUEST_CANCEL)
        self._log = redis.register_script(scripts.LOG)

    # -- keys -------------------------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    def _events_key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}:events"

    def _index_key(self, tenant: str) -> str:
        return f"{self._prefix}tenant:{tenant}:jobs"

    @staticmethod
    def _not_found(job_id: str) -> JobNotFound:
        # One message for "missing" and "another tenant's": nothing leaks across tenants.
        return JobNotFound(f"job {job_id} not found", job_id=job_id)

    def _checked_id(self, job_id: str) -> str:
        if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
            raise self._not_found(str(job_id))
        return job_id

    def _event(self, kind: str, **fields: Any) -> str:
        return _dumps({"ts": iso(self._clock()), "type": kind, **fields})

    # -- create and read --------------------------------------------------------------

    def create(self, *, tenant: str, type: JobType | str, params: Mapping[str, Any],
               job_id: str | None = None) -> JobRecord:
        """A new queued job; `job_id` may be chosen by the caller (Conflict if taken)."""
        if not tenant:
            raise ValueError("tenant must be a non-empty string")
        job_id = new_job_id() if job_id is None else job_id
        if not _JOB_ID.match(job_id):
            raise InvalidRequest(f"job id {job_id!r} is not of the form [A-Za-z0-9_-]{{1,128}}",
                                 code="invalid_job_id")
        now = self._clock()
        record = JobRecord(id=job_id, tenant=tenant, type=JobType(type),
                           status=JobStatus.QUEUED, created_at=iso(now), params=dict(params))
        args: list[str] = [repr(now.timestamp()), job_id,
                           self._event("status", status=JobStatus.QUEUED.value),
                           str(self._max_events)]
        for name, value in record.to_dict().items():
            args += [name, _dumps(value)]
        reply = _texts(self._create(keys=[self._job_key(job_id), self._events_key(job_id),
                                          self._index_key(tenant)], args=args))
        if reply[0] == "exists":
            raise Conflict(f"job {job_id} already exists", code="job_exists", job_id=job_id)
        logger.info("job %s: created (%s, tenant %s)", job_id, record.type.value, tenant)
        return record

    def get(self, job_id: str, *, tenant: str | None = None) -> JobRecord:
        """The job; `tenant` scopes the lookup (None only for internal callers)."""
        self._checked_id(job_id)
        raw = self._redis.hgetall(self._job_key(job_id))
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if not fields:
            raise self._not_found(job_id)
        record = _record(job_id, fields)
        if tenant is not None and record.tenant != tenant:
            raise self._not_found(job_id)
        return record

    def list(self, *, tenant: str, status: JobStatus | str | None = None,
             type: JobType | str | None = None, limit: int = 50,
             cursor: str | None = None) -> JobPage:
        """The tenant's jobs, newest first; `cursor` is the last id of the previous page.

        Filters are applied while scanning the tenant's index, so a page may need several
        round trips when few jobs match; fine at the scale of one tenant's job history.
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}",
                                 code="invalid_limit")
        try:
            want_status = JobStatus(status) if status is not None else None
            want_type = JobType(type) if type is not None else None
        except ValueError as e:
            raise InvalidRequest(str(e), code="invalid_filter") from e
        index = self._index_key(tenant)
        position = 0
        if cursor is not None:
            rank = self._redis.zrevrank(index, cursor) if _JOB_ID.match(cursor) else None
            if rank is None:
                raise InvalidRequest(f"cursor {cursor!r} is not valid", code="invalid_cursor")
            position = int(rank) + 1  # type: ignore[arg-type]
        items: list[JobRecord] = []
        batch = max(limit, 50)
        while len(items) < limit:
            window = cast("Sequence[bytes | str]",
                          self._redis.zrevrange(index, position, position + batch - 1))
            ids = [_text(i) for i in window]
            if not ids:
                break
            pipe = self._redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self._job_key(job_id))
            for job_id, raw in zip(ids, pipe.execute(), strict=True):
                position += 1
                if not raw:  # the record expired (retention) or was removed: drop its entry
                    self._redis.zrem(index, job_id)
                    position -= 1
                    continue
                record = _record(job_id, {_text(k): _text(v) for k, v in raw.items()})
                if ((want_status is None or record.status is want_status)
                        and (want_type is None or record.type is want_type)):
                    items.append(record)
                    if len(items) == limit:
                        break
        more = len(items) == limit and position < int(self._redis.zcard(index))
        return JobPage(items=items, next_cursor=items[-1].id if more else None)

    # -- state changes ----------------------------------------------------------------

    def _move(self, job_id: str, target: JobStatus, fields: Mapping[str, Any], *,
              event: str, attempt: int | None = None, count_attempt: bool = False,
              tenant: str | None = None) -> JobRecord:
        self._checked_id(job_id)
        sources = " ".join(sorted(s.value for s in allowed_sources(target)))
        args = [_dumps(tenant) if tenant is not None else "", sources,
                "" if attempt is None else str(attempt), "1" if count_attempt else "0",
                event, str(self._max_events)]
        for name, value in {"status": target.value, **fields}.items():
            args += [name, _dumps(value)]
        reply = _texts(self._transition(keys=[self._job_key(job_id),
                                              self._events_key(job_id)], args=args))
        if reply[0] == "missing":
            raise self._not_found(job_id)
        if reply[0] == "illegal":
            raise transition_error(job_id, JobStatus(reply[1]), target)
        if reply[0] == "stale":
            raise _stale(job_id, reply[1], attempt)
        record = _record(job_id, _pairs(reply[1]))
        logger.info("job %s: %s (attempt %d)", job_id, target.value, record.attempts)
        self._expire_if_finished(record)
        return record

    def _expire_if_finished(self, record: JobRecord) -> None:
        if self._retention_s > 0 and record.status in TERMINAL_STATUSES:
            pipe = self._redis.pipeline(transaction=False)
            pipe.expire(self._job_key(record.id), self._retention_s)
            pipe.expire(self._events_key(record.id), self._retention_s)
            pipe.execute()

    def mark_running(self, job_id: str) -> JobRecord:
        """Start an attempt: from queued, or from running when a dead worker's job is retried.

        Counts the attempt; a caller that wants to fence off a superseded attempt passes
        the returned `attempts` as `attempt=` to the later calls.
        """
        return self._move(job_id, JobStatus.RUNNING,
                          {"started_at": iso(self._clock()),
                           "progress": Progress("starting", 0.0).to_dict()},
                          event=self._event("status", status=JobStatus.RUNNING.value),
                          count_attempt=True)

    def mark_succeeded(self, job_id: str, result: Mapping[str, Any], *,
                       attempt: int | None = None) -> JobRecord:
        return self._move(job_id, JobStatus.SUCCEEDED,
                          {"finished_at": iso(self._clock()), "result": dict(result),
                           "progress": Progress("done", 1.0).to_dict()},
                          event=self._event("status", status=JobStatus.SUCCEEDED.value),
                          attempt=attempt)

    def mark_failed(self, job_id: str, error: Mapping[str, Any], *,
                    attempt: int | None = None) -> JobRecord:
        """Terminal failure; `error` is {code, message, retryable?} (see errors.to_dict())."""
        payload = normalise_error(error)
        event = self._event("status", status=JobStatus.FAILED.value,
                            message=f"{payload['code']}: {payload['message']}")
        return self._move(job_id, JobStatus.FAILED,
                          {"finished_at": iso(self._clock()), "error": payload},
                          event=event, attempt=attempt)

    def mark_cancelled(self, job_id: str, *, attempt: int | None = None) -> JobRecord:
        """The worker saw the cancel flag (or the job never started) and stopped."""
        return self._move(job_id, JobStatus.CANCELLED, {"finished_at": iso(self._clock())},
                          event=self._event("status", status=JobStatus.CANCELLED.value),
                          attempt=attempt)

    def set_progress(self, job_id: str, stage: str, fraction: float, *,
                     attempt: int | None = None) -> None:
        """Overwrite the progress field only; an event is appended when the stage changes.

        Raises Conflict(job_finished) for a terminal job and, given `attempt`,
        Conflict(stale_attempt) once a newer attempt started: a late worker must stop.
        """
        self._checked_id(job_id)
        progress = Progress(stage, float(fraction)).to_dict()
        reply = _texts(self._progress(
            keys=[self._job_key(job_id), self._events_key(job_id)],
            args=[_dumps(progress), stage, self._event("progress", **progress),
                  str(self._max_events), " ".join(s.value for s in TERMINAL_STATUSES),
                  "" if attempt is None else str(attempt)]))
        if reply[0] == "missing":
            raise self._not_found(job_id)
        if reply[0] == "illegal":
            raise Conflict(f"job {job_id} is {reply[1]}; its progress can no longer change",
                           code="job_finished", job_id=job_id, status=reply[1])
        if reply[0] == "stale":
            raise _stale(job_id, reply[1], attempt)
        logger.debug("job %s: progress %s %.3f", job_id, stage, fraction)

    def log(self, job_id: str, message: str) -> None:
        """Append a free-text line to the job's events (what a user sees in the timeline)."""
        self._checked_id(job_id)
        reply = _texts(self._log(keys=[self._job_key(job_id), self._events_key(job_id)],
                                 args=[self._event("log", message=message),
                                       str(self._max_events)]))
        if reply[0] == "missing":
            raise self._not_found(job_id)

    # -- cancellation -----------------------------------------------------------------

    def request_cancel(self, job_id: str, *, tenant: str | None) -> JobRecord:
        """Queued → cancelled now; running → flag set; cancelled → unchanged; else Conflict."""
        self._checked_id(job_id)
        reply = _texts(self._cancel(
            keys=[self._job_key(job_id), self._events_key(job_id)],
            args=[_dumps(tenant) if tenant is not None else "", _dumps(iso(self._clock())),
                  self._event("status", status=JobStatus.CANCELLED.value),
                  self._event("log", message="cancel requested"), str(self._max_events)]))
        if reply[0] == "missing":
            raise self._not_found(job_id)
        if reply[0] == "illegal":
            raise Conflict(f"job {job_id} already {reply[1]}; there is nothing to cancel",
                           code="job_finished", job_id=job_id, status=reply[1])
        record = _record(job_id, _pairs(reply[1]))
        logger.info("job %s: cancel requested (now %s)", job_id, record.status.value)
        self._expire_if_finished(record)
        return record

    def is_cancel_requested(self, job_id: str) -> bool:
        """One HGET: cheap enough to poll between modules."""
        raw = self._redis.hget(self._job_key(self._checked_id(job_id)), "cancel_requested")
        if raw is None:
            raise self._not_found(job_id)
        return _text(raw) == "true"

    def checkpoint(self, job_id: str, *, attempt: int | None = None) -> None:
        """Raise JobCancelled when a cancel was requested, and, given `attempt`,
        Conflict(stale_attempt) once a newer attempt started; the worker calls this often
        (one HMGET)."""
        flag, current = self._redis.hmget(self._job_key(self._checked_id(job_id)),
                                          ["cancel_requested", "attempts"])
        if flag is None:
            raise self._not_found(job_id)
        if attempt is not None and (current is None or _text(current) != str(attempt)):
            raise _stale(job_id, "?" if current is None else _text(current), attempt)
        if _text(flag) == "true":
            logger.info("job %s: cancel flag seen, stopping", job_id)
            raise JobCancelled(f"job {job_id} was cancelled", job_id=job_id)

    # -- events -----------------------------------------------------------------------

    def events(self, job_id: str, *, tenant: str | None,
               since: int = 0) -> builtins.list[dict[str, Any]]:
        """The job's events with `seq` greater than `since`, oldest first."""
        self._checked_id(job_id)
        if not 0 <= since < MAX_EVENT_SEQ:
            raise InvalidRequest(f"since must be in [0, {MAX_EVENT_SEQ}), got {since}",
                                 code="invalid_since")
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(self._job_key(job_id), "tenant")
        pipe.xrange(self._events_key(job_id), min=f"{since + 1}-0", max="+")
        owner, entries = pipe.execute()
        if owner is None or (tenant is not None and json.loads(_text(owner)) != tenant):
            raise self._not_found(job_id)
        events: builtins.list[dict[str, Any]] = []
        for entry_id, fields in entries:
            payload = {_text(k): _text(v) for k, v in fields.items()}
            events.append({"seq": int(_text(entry_id).split("-")[0]),
                           **json.loads(payload["event"])})
        return events
