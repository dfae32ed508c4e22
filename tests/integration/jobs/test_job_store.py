"""JobStore against a real redis-server: records, listing, transitions, events, cancel."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from redis import Redis

from lorafold.errors import Conflict, InvalidRequest, JobCancelled, JobNotFound
from lorafold.jobs import JobRecord, JobStatus, JobStore, JobType, Progress
from lorafold.jobs.models import parse_iso
from lorafold.servers.redis import RedisServer

PARAMS = {"adapters": [{"id": "ad_1", "weight": 1.0}, {"id": "ad_2", "weight": -0.5}],
          "method": "ctm", "rule": "ties", "rank": 16}


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def new_job(store: JobStore, tenant: str = "acme", type: JobType = JobType.MERGE) -> JobRecord:
    return store.create(tenant=tenant, type=type, params=PARAMS)


# -- create / get ---------------------------------------------------------------------


def test_create_then_get(store: JobStore) -> None:
    job = new_job(store)
    assert job.id.startswith("job_") and len(job.id) == 36
    assert job.status is JobStatus.QUEUED and job.attempts == 0
    assert job.started_at is None and job.finished_at is None
    assert job.created_at.endswith("Z")
    got = store.get(job.id, tenant="acme")
    assert got == job
    assert got.params == PARAMS


def test_record_is_stored_as_json_under_our_prefix(store: JobStore, redis_client: Redis) -> None:
    job = new_job(store)
    keys = sorted(text(k) for k in redis_client.keys("*"))
    assert keys == [f"lorafold:job:{job.id}", f"lorafold:job:{job.id}:events",
                    "lorafold:tenant:acme:jobs"]
    raw = redis_client.hgetall(f"lorafold:job:{job.id}")
    decoded = {text(k): json.loads(v) for k, v in raw.items()}
    assert decoded["status"] == "queued" and decoded["params"] == PARAMS


def test_other_tenant_sees_exactly_what_a_missing_id_shows(store: JobStore) -> None:
    job = new_job(store, tenant="acme")
    with pytest.raises(JobNotFound) as other:
        store.get(job.id, tenant="globex")
    missing_id = "job_" + "0" * 32
    with pytest.raises(JobNotFound) as missing:
        store.get(missing_id, tenant="globex")
    assert type(other.value) is type(missing.value) is JobNotFound
    assert other.value.code == missing.value.code == "job_not_found"
    assert other.value.message == missing.value.message.replace(missing_id, job.id)
    # The same holds for every tenant-scoped call.
    with pytest.raises(JobNotFound):
        store.events(job.id, tenant="globex")
    with pytest.raises(JobNotFound):
        store.request_cancel(job.id, tenant="globex")
    assert store.get(job.id).status is JobStatus.QUEUED


@pytest.mark.parametrize("bad_id", ["", "job_1/../x", "job 1", "x" * 200, "job:1"])
def test_malformed_ids_are_not_found(store: JobStore, bad_id: str) -> None:
    with pytest.raises(JobNotFound):
        store.get(bad_id)


def test_chosen_id_cannot_be_reused(store: JobStore) -> None:
    store.create(tenant="acme", type="unlearn", params={}, job_id="job_fixed")
    with pytest.raises(Conflict) as info:
        store.create(tenant="globex", type="merge", params={}, job_id="job_fixed")
    assert info.value.code == "job_exists"
    assert store.get("job_fixed").tenant == "acme"
    with pytest.raises(InvalidRequest):
        store.create(tenant="acme", type="merge", params={}, job_id="bad id")


def test_works_with_a_decoding_client(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        store = JobStore(client, prefix="lorafold-test-decoded:")
        job = new_job(store)
        store.mark_running(job.id)
        store.set_progress(job.id, "merge", 0.25)
        assert store.get(job.id, tenant="acme").progress == Progress("merge", 0.25)
        assert store.list(tenant="acme").items[0].id == job.id
        assert [e["type"] for e in store.events(job.id, tenant="acme")] == [
            "status", "status", "progress"]
        assert store.is_cancel_requested(job.id) is False
    finally:
        client.close()


# -- list ------------------------------------------------------------------------------


def test_list_is_tenant_scoped_and_newest_first(store: JobStore) -> None:
    mine = [new_job(store, "acme") for _ in range(5)]
    new_job(store, "globex")
    page = store.list(tenant="acme")
    assert [j.id for j in page.items] == [j.id for j in reversed(mine)]
    assert page.next_cursor is None
    created = [parse_iso(j.created_at) for j in page.items]
    assert created == sorted(created, reverse=True)
    assert store.list(tenant="nobody").items == []


def test_list_paginates_with_a_cursor(store: JobStore) -> None:
    ids = [new_job(store).id for _ in range(7)][::-1]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = store.list(tenant="acme", limit=3, cursor=cursor)
        seen += [j.id for j in page.items]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == ids and pages == 3
    # An exact multiple of the limit ends without an extra empty page.
    page = store.list(tenant="acme", limit=7)
    assert len(page.items) == 7 and page.next_cursor is None


def test_new_jobs_do_not_shift_a_page_in_progress(store: JobStore) -> None:
    old = [new_job(store).id for _ in range(4)][::-1]
    first = store.list(tenant="acme", limit=2)
    new_job(store)  # arrives between two page requests
    second = store.list(tenant="acme", limit=2, cursor=first.next_cursor)
    assert [j.id for j in first.items + second.items] == old


def test_list_filters_by_status_and_type(store: JobStore) -> None:
    merges = [new_job(store, type=JobType.MERGE) for _ in range(6)]
    unlearn = new_job(store, type=JobType.UNLEARN)
    for job in merges[::2]:
        store.mark_running(job.id)
        store.mark_succeeded(job.id, {"adapter_id": "ad_x", "report": {}})
    done = store.list(tenant="acme", status="succeeded", limit=2)
    assert [j.id for j in done.items] == [merges[4].id, merges[2].id]
    rest = store.list(tenant="acme", status=JobStatus.SUCCEEDED, limit=2,
                      cursor=done.next_cursor)
    assert [j.id for j in rest.items] == [merges[0].id]
    assert [j.id for j in store.list(tenant="acme", type="unlearn").items] == [unlearn.id]
    queued_merges = store.list(tenant="acme", status="queued", type=JobType.MERGE)
    assert [j.id for j in queued_merges.items] == [merges[5].id, merges[3].id, merges[1].id]


def test_list_rejects_bad_cursor_and_limit(store: JobStore) -> None:
    theirs = new_job(store, "globex")
    new_job(store, "acme")
    for cursor in ["nope", theirs.id, "job_" + "f" * 32]:
        with pytest.raises(InvalidRequest) as info:
            store.list(tenant="acme", cursor=cursor)
        assert info.value.code == "invalid_cursor"
    for limit in [0, 501]:
        with pytest.raises(InvalidRequest):
            store.list(tenant="acme", limit=limit)
    with pytest.raises(InvalidRequest) as bad_filter:
        store.list(tenant="acme", status="paused")
    assert bad_filter.value.code == "invalid_filter"


# -- transitions -----------------------------------------------------------------------


def test_happy_path(store: JobStore) -> None:
    job = new_job(store)
    running = store.mark_running(job.id)
    assert running.status is JobStatus.RUNNING and running.attempts == 1
    assert running.started_at is not None and running.finished_at is None
    result = {"adapter_id": "ad_out", "report": {"energy": {"ad_1": 0.97}}}
    done = store.mark_succeeded(job.id, result)
    assert done.status is JobStatus.SUCCEEDED and done.result == result
    assert done.progress == Progress("done", 1.0)
    assert done.finished_at is not None and running.started_at is not None
    assert done.finished_at >= running.started_at
    assert store.get(job.id) == done


def test_failure_records_a_normalised_error(store: JobStore) -> None:
    job = new_job(store)
    store.mark_running(job.id)
    failed = store.mark_failed(job.id, {"code": "non_finite_result", "message": "NaN in q_proj"})
    assert failed.status is JobStatus.FAILED
    assert failed.error == {"code": "non_finite_result", "message": "NaN in q_proj",
                            "retryable": False}
    last = store.events(job.id, tenant="acme")[-1]
    assert last["status"] == "failed" and "NaN in q_proj" in last["message"]


def test_a_queued_job_may_fail_before_it_starts(store: JobStore) -> None:
    job = new_job(store)
    assert store.mark_failed(job.id, {"code": "x", "message": "y"}).status is JobStatus.FAILED


@pytest.mark.parametrize("finish", ["succeeded", "failed", "cancelled"])
def test_terminal_jobs_never_move_again(store: JobStore, finish: str) -> None:
    job = new_job(store)
    store.mark_running(job.id)
    finishers: dict[str, Callable[[], Any]] = {
        "succeeded": lambda: store.mark_succeeded(job.id, {"adapter_id": "a", "report": {}}),
        "failed": lambda: store.mark_failed(job.id, {"code": "c", "message": "m"}),
        "cancelled": lambda: store.mark_cancelled(job.id),
    }
    final = finishers[finish]()
    for name, again in [("running", lambda: store.mark_running(job.id)), *finishers.items()]:
        with pytest.raises(Conflict) as info:
            again()
        assert info.value.code == "job_finished", name
    with pytest.raises(Conflict):
        store.set_progress(job.id, "late", 0.9)
    assert store.get(job.id) == final


def test_queued_cannot_skip_to_succeeded(store: JobStore) -> None:
    job = new_job(store)
    with pytest.raises(Conflict) as info:
        store.mark_succeeded(job.id, {"adapter_id": "a", "report": {}})
    assert info.value.code == "invalid_transition"
    assert store.get(job.id).status is JobStatus.QUEUED


def test_unknown_job_is_not_found_for_every_change(store: JobStore) -> None:
    missing = "job_" + "1" * 32
    for call in [lambda: store.mark_running(missing),
                 lambda: store.mark_cancelled(missing),
                 lambda: store.set_progress(missing, "x", 0.1),
                 lambda: store.log(missing, "hello"),
                 lambda: store.is_cancel_requested(missing)]:
        with pytest.raises(JobNotFound):
            call()


def test_retry_of_a_crashed_attempt_counts_attempts(store: JobStore) -> None:
    job = new_job(store)
    first = store.mark_running(job.id)
    store.set_progress(job.id, "merge", 0.6)
    second = store.mark_running(job.id)  # the first worker died; RQ retried the job
    assert second.attempts == 2
    assert second.progress == Progress("starting", 0.0)
    assert second.started_at is not None and first.started_at is not None
    assert second.started_at >= first.started_at


def test_a_superseded_attempt_cannot_finish_the_job(store: JobStore) -> None:
    job = new_job(store)
    old = store.mark_running(job.id).attempts
    new = store.mark_running(job.id).attempts
    with pytest.raises(Conflict) as info:
        store.mark_succeeded(job.id, {"adapter_id": "stale", "report": {}}, attempt=old)
    assert info.value.code == "stale_attempt"
    done = store.mark_succeeded(job.id, {"adapter_id": "fresh", "report": {}}, attempt=new)
    assert done.result == {"adapter_id": "fresh", "report": {}}


# -- races -------------------------------------------------------------------------------


def race(n: int, action: Callable[[int], Any]) -> list[Any]:
    """Run action(i) in n threads released together; return each result or exception."""
    barrier = threading.Barrier(n)
    outcomes: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = action(i)
        except Exception as e:  # collected and asserted on by the caller
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return outcomes


def test_racing_mark_running_loses_no_attempt(store: JobStore) -> None:
    job = new_job(store)
    outcomes = race(8, lambda _: store.mark_running(job.id))
    assert all(isinstance(o, JobRecord) for o in outcomes)
    assert sorted(o.attempts for o in outcomes) == list(range(1, 9))
    assert store.get(job.id).attempts == 8


def test_racing_finishers_exactly_one_wins(store: JobStore) -> None:
    for _ in range(10):
        job = new_job(store)
        store.mark_running(job.id)

        def finish(i: int, job_id: str = job.id) -> JobRecord:
            if i % 2:
                return store.mark_failed(job_id, {"code": f"w{i}", "message": "m"})
            return store.mark_succeeded(job_id, {"adapter_id": f"w{i}", "report": {}})

        outcomes = race(6, finish)
        winners = [o for o in outcomes if isinstance(o, JobRecord)]
        losers = [o for o in outcomes if isinstance(o, Conflict)]
        assert len(winners) == 1 and len(losers) == 5
        assert all(e.code == "job_finished" for e in losers)
        final = store.get(job.id)
        assert final == winners[0]
        # Never half of one and half of the other.
        assert (final.result is None) != (final.error is None)


def test_racing_cancel_and_start_leave_a_consistent_record(store: JobStore) -> None:
    for _ in range(10):
        job = new_job(store)

        def start_or_cancel(i: int, job_id: str = job.id) -> JobRecord:
            if i == 0:
                return store.mark_running(job_id)
            return store.request_cancel(job_id, tenant="acme")

        outcomes = race(2, start_or_cancel)
        final = store.get(job.id)
        if isinstance(outcomes[0], Conflict):  # cancel came first: the job never runs
            assert final.status is JobStatus.CANCELLED and final.attempts == 0
        else:  # start came first: the job runs with its cancel flag set
            assert final.status is JobStatus.RUNNING and final.cancel_requested
            with pytest.raises(JobCancelled):
                store.checkpoint(job.id)


# -- progress and events ---------------------------------------------------------------


def test_progress_overwrites_and_logs_stage_changes_only(store: JobStore) -> None:
    job = new_job(store)
    store.mark_running(job.id)
    store.set_progress(job.id, "load", 0.0)
    store.set_progress(job.id, "load", 0.1)
    store.set_progress(job.id, "merge", 0.2)
    store.set_progress(job.id, "merge", 0.7)
    store.log(job.id, "q_proj done")
    store.set_progress(job.id, "write", 0.9)
    assert store.get(job.id).progress == Progress("write", 0.9)
    events = store.events(job.id, tenant="acme")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    summary = [(e["type"], e.get("status") or e.get("stage") or e.get("message"))
               for e in events]
    assert summary == [("status", "queued"), ("status", "running"), ("progress", "load"),
                       ("progress", "merge"), ("log", "q_proj done"), ("progress", "write")]
    assert events[3]["fraction"] == 0.2
    assert all(e["ts"].endswith("Z") for e in events)
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)


def test_progress_rejects_out_of_range(store: JobStore) -> None:
    job = new_job(store)
    store.mark_running(job.id)
    with pytest.raises(ValueError):
        store.set_progress(job.id, "merge", 1.5)
    assert store.get(job.id).progress == Progress("starting", 0.0)


def test_events_since(store: JobStore) -> None:
    job = new_job(store)
    store.mark_running(job.id)
    store.log(job.id, "a")
    store.log(job.id, "b")
    assert [e["seq"] for e in store.events(job.id, tenant="acme", since=2)] == [3, 4]
    assert store.events(job.id, tenant="acme", since=4) == []
    assert store.events(job.id, tenant=None, since=3)[0]["message"] == "b"
    for since in (-1, 2**63, 10**30):      # 10**30 used to reach Redis as a stream id
        with pytest.raises(InvalidRequest) as err:
            store.events(job.id, tenant="acme", since=since)
        assert err.value.code == "invalid_since"
    assert store.events(job.id, tenant="acme", since=2**63 - 1) == []


def test_event_stream_is_capped_and_keeps_numbering(redis_client: Redis) -> None:
    store = JobStore(redis_client, max_events=5)
    job = new_job(store)
    for i in range(20):
        store.log(job.id, f"line {i}")
    events = store.events(job.id, tenant="acme")
    assert [e["seq"] for e in events] == [17, 18, 19, 20, 21]
    assert events[-1]["message"] == "line 19"
    assert redis_client.xlen(f"lorafold:job:{job.id}:events") == 5


# -- cancellation ------------------------------------------------------------------------


def test_cancel_a_queued_job_at_once(store: JobStore) -> None:
    job = new_job(store)
    cancelled = store.request_cancel(job.id, tenant="acme")
    assert cancelled.status is JobStatus.CANCELLED and cancelled.finished_at is not None
    assert cancelled.cancel_requested
    # The worker that later picks it up is told the job is finished and skips it.
    with pytest.raises(Conflict) as info:
        store.mark_running(job.id)
    assert info.value.code == "job_finished"
    assert store.events(job.id, tenant="acme")[-1]["status"] == "cancelled"


def test_cancel_a_running_job_cooperatively(store: JobStore) -> None:
    job = new_job(store)
    store.mark_running(job.id)
    store.checkpoint(job.id)  # no flag yet: nothing happens
    assert store.is_cancel_requested(job.id) is False
    flagged = store.request_cancel(job.id, tenant="acme")
    assert flagged.status is JobStatus.RUNNING and flagged.cancel_requested
    again = store.request_cancel(job.id, tenant="acme")  # repeating adds no event
    assert again == flagged
    assert store.is_cancel_requested(job.id) is True
    with pytest.raises(JobCancelled) as info:
        store.checkpoint(job.id)
    assert info.value.code == "cancelled"
    final = store.mark_cancelled(job.id)
    assert final.status is JobStatus.CANCELLED
    kinds = [(e["type"], e.get("status") or e.get("message"))
             for e in store.events(job.id, tenant="acme")]
    assert kinds == [("status", "queued"), ("status", "running"), ("log", "cancel requested"),
                     ("status", "cancelled")]


def test_cancel_a_cancelled_job_returns_it_unchanged(store: JobStore) -> None:
    job = new_job(store)
    first = store.request_cancel(job.id, tenant="acme")
    assert store.request_cancel(job.id, tenant="acme") == first
    assert len(store.events(job.id, tenant="acme")) == 2


@pytest.mark.parametrize("finish", ["succeeded", "failed"])
def test_cancel_a_finished_job_is_a_conflict(store: JobStore, finish: str) -> None:
    job = new_job(store)
    store.mark_running(job.id)
    if finish == "succeeded":
        store.mark_succeeded(job.id, {"adapter_id": "a", "report": {}})
    else:
        store.mark_failed(job.id, {"code": "c", "message": "m"})
    with pytest.raises(Conflict) as info:
        store.request_cancel(job.id, tenant="acme")
    assert info.value.code == "job_finished"
    assert store.get(job.id).cancel_requested is False


def test_a_superseded_attempt_can_neither_report_nor_fail(store: JobStore) -> None:
    """A worker wrongly declared dead keeps running: its checkpoints, progress and failure
    record are refused, and the live attempt can still finish the job."""
    job = new_job(store)
    old = store.mark_running(job.id).attempts
    live = store.mark_running(job.id).attempts  # re-queued and started elsewhere
    for write in (lambda: store.checkpoint(job.id, attempt=old),
                  lambda: store.set_progress(job.id, "merge", 0.5, attempt=old),
                  lambda: store.mark_failed(job.id, {"code": "job_timeout", "message": "late"},
                                            attempt=old)):
        with pytest.raises(Conflict) as info:
            write()
        assert info.value.code == "stale_attempt"
    assert store.get(job.id).progress.stage != "merge"  # nothing of the stale attempt landed
    store.checkpoint(job.id, attempt=live)
    store.set_progress(job.id, "merge", 0.5, attempt=live)
    done = store.mark_succeeded(job.id, {"adapter_id": "ad_live", "report": {}}, attempt=live)
    assert done.status is JobStatus.SUCCEEDED and done.result["adapter_id"] == "ad_live"


def test_finished_jobs_expire_after_the_retention(redis_client: Redis) -> None:
    """Redis must not grow without bound: a finished job's record and events expire; the
    running one stays; listings drop the index entries of expired ones."""
    import time

    store = JobStore(redis_client, prefix="lorafold-retention:", retention_s=1)
    done, cancelled, running = (new_job(store) for _ in range(3))
    store.mark_running(done.id)
    store.set_progress(done.id, "merge", 0.5)
    store.mark_succeeded(done.id, {"adapter_id": "ad_x", "report": {}})
    store.request_cancel(cancelled.id, tenant="acme")  # queued → cancelled at once
    store.mark_running(running.id)
    for job_id in (done.id, cancelled.id):
        assert 0 < redis_client.ttl(f"lorafold-retention:job:{job_id}") <= 1
        assert 0 < redis_client.ttl(f"lorafold-retention:job:{job_id}:events") <= 1
    assert redis_client.ttl(f"lorafold-retention:job:{running.id}") == -1  # no expiry
    time.sleep(1.3)
    with pytest.raises(JobNotFound):
        store.get(done.id)
    assert [j.id for j in store.list(tenant="acme").items] == [running.id]
    assert redis_client.zcard("lorafold-retention:tenant:acme:jobs") == 1
    # 0 keeps everything, as before
    keep = JobStore(redis_client, prefix="lorafold-keep:")
    job = new_job(keep)
    keep.mark_running(job.id)
    keep.mark_failed(job.id, {"code": "x", "message": "y"})
    assert redis_client.ttl(f"lorafold-keep:job:{job.id}") == -1
