"""Per-tenant quotas and bounds on work, each checked before anything is stored or queued.

- Stored bytes (`tenant_max_stored_bytes`): the sizes the tenant's adapter and data set
  manifests name, a shared blob counted for each (what the tenant would store alone).
  An upload that would pass the quota, or a job submitted once it is reached (its output
  would add more), is refused: 413 `storage_quota_exceeded`.
- Queued + running jobs (`tenant_max_active_jobs`): a sorted set of the tenant's live job
  ids, checked and extended by one Lua script, so two concurrent submissions cannot both
  take the last slot. Members are dropped lazily once their record says the job finished
  (or expired), so no state change has to remember to free a slot: 429
  `job_quota_exceeded`.
- Work: output rank (`max_rank`), unlearning steps (`max_unlearn_steps`), examples in a
  data set (`max_dataset_examples`): 422 `rank_too_large` / `too_many_steps` /
  `too_many_examples`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from redis import Redis

from lorafold.errors import InvalidRequest, PayloadTooLarge, QuotaExceeded
from lorafold.jobs import JobType
from lorafold.settings import Settings

if TYPE_CHECKING:
    from lorafold.service.context import ServiceContext

JOB_KEY_PREFIX = "lorafold:job:"  # JobStore's record keys (its default prefix)
# A slot reserved for a job whose record is not written yet stays taken this long.
RESERVATION_S = 60

# KEYS[1] the tenant's live-job set; ARGV: now, job id, limit, record key prefix, grace.
_RESERVE = """
local live = 0
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #members, 2 do
  local id, since = members[i], tonumber(members[i + 1])
  local status = redis.call('HGET', ARGV[4] .. id, 'status')
  if status == '"queued"' or status == '"running"'
      or (not status and tonumber(ARGV[1]) - since < tonumber(ARGV[5])) then
    live = live + 1
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
if tonumber(ARGV[3]) > 0 and live >= tonumber(ARGV[3]) then
  return {'full', live}
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
return {'ok', live + 1}
"""


class ActiveJobs:
    """The queued and running jobs of each tenant, for the quota and for "in use" checks."""

    def __init__(self, redis: Redis, *, prefix: str = "lorafold:") -> None:
        self._redis = redis
        self._prefix = prefix
        self._reserve = redis.register_script(_RESERVE)

    def _key(self, tenant: str) -> str:
        return f"{self._prefix}tenant:{tenant}:active-jobs"

    def reserve(self, *, tenant: str, job_id: str, limit: int, now: float) -> None:
        """Take a slot for `job_id`, or QuotaExceeded when `limit` (> 0) are taken."""
        reply = self._reserve(keys=[self._key(tenant)],
                              args=[repr(now), job_id, str(limit), JOB_KEY_PREFIX,
                                    str(RESERVATION_S)])
        status = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        if status == "full":
            raise QuotaExceeded(f"tenant {tenant} already has {limit} queued or running jobs "
                                "(the quota); retry when one has finished",
                                code="job_quota_exceeded", limit=limit)

    def release(self, *, tenant: str, job_id: str) -> None:
        self._redis.zrem(self._key(tenant), job_id)

    def job_ids(self, tenant: str) -> list[str]:
        """The ids that may be live (finished ones are dropped at the next reserve)."""
        return [i.decode() if isinstance(i, bytes) else str(i)
                for i in self._redis.zrange(self._key(tenant), 0, -1)]


def tenant_stored_bytes(ctx: ServiceContext, tenant: str) -> int:
    """0 without reading anything when there is no quota; else one listing per kind."""
    if not ctx.settings.tenant_max_stored_bytes:
        return 0
    return ctx.adapters.stored_bytes(tenant) + ctx.datasets.stored_bytes(tenant)


def check_storage_quota(settings: Settings, *, tenant: str, used: int, adding: int) -> None:
    """Refuse storing `adding` more bytes when the tenant would pass its quota (and any
    new job once it is reached: `adding` 0)."""
    limit = settings.tenant_max_stored_bytes
    if limit and (used + adding > limit or (adding == 0 and used >= limit)):
        raise PayloadTooLarge(f"tenant {tenant} stores {used} bytes; {adding} more would pass "
                              f"its quota of {limit} bytes: delete adapters or data sets "
                              "first", code="storage_quota_exceeded", limit=limit)


def _ranks(job_type: JobType, params: Mapping[str, Any]) -> list[Any]:
    if job_type is JobType.MERGE:
        return [params.get("request", {}).get("rank")]
    if job_type is JobType.PLAN:
        options = params.get("options", {})
        return [options.get("rank"), options.get("max_rank")]
    return [params.get("rank")]


def check_work_bounds(settings: Settings, job_type: JobType, params: Mapping[str, Any]) -> None:
    """Refuse a job asking for more work than the service allows (rank, steps)."""
    for rank in _ranks(job_type, params):
        if isinstance(rank, int) and not isinstance(rank, bool) and rank > settings.max_rank:
            raise InvalidRequest(f"rank {rank} is above this service's limit of "
                                 f"{settings.max_rank}", code="rank_too_large",
                                 limit=settings.max_rank)
    hyperparams = params.get("hyperparams") or {}
    for name in ("max_steps", "relearn_probe_steps"):
        steps = hyperparams.get(name)
        if isinstance(steps, int) and steps > settings.max_unlearn_steps:
            raise InvalidRequest(f"hyperparams.{name} = {steps} is above this service's limit "
                                 f"of {settings.max_unlearn_steps} steps",
                                 code="too_many_steps", limit=settings.max_unlearn_steps)


def check_examples(settings: Settings, count: int) -> None:
    if count > settings.max_dataset_examples:
        raise InvalidRequest(f"the data set has {count} examples, more than this service's "
                             f"limit of {settings.max_dataset_examples}",
                             code="too_many_examples", limit=settings.max_dataset_examples)
