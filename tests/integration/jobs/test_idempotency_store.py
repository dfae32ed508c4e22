"""Idempotency-Key semantics against a real Redis, including concurrent identical POSTs."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from redis import Redis

from lorafold.errors import Conflict, InvalidRequest
from lorafold.jobs import IdempotencyStore, JobStore, body_hash

BODY = {"adapters": [{"id": "ad_1", "weight": 1.0}], "rank": 8}
H = body_hash(BODY)
SCOPE = "merges"


def test_body_hash_ignores_key_order_but_not_values() -> None:
    assert body_hash({"a": 1, "b": [1, 2]}) == body_hash({"b": [1, 2], "a": 1})
    assert body_hash({"a": 1}) != body_hash({"a": 2})
    assert len(H) == 64


def test_first_claim_owns_then_replays(idem: IdempotencyStore) -> None:
    assert idem.claim(tenant="acme", scope=SCOPE, key="k1", body_hash=H) is None
    idem.complete(tenant="acme", scope=SCOPE, key="k1", body_hash=H, value={"job_id": "job_1"})
    assert idem.claim(tenant="acme", scope=SCOPE, key="k1", body_hash=H) == {"job_id": "job_1"}
    assert idem.lookup(tenant="acme", scope=SCOPE, key="k1", body_hash=H) == {"job_id": "job_1"}


def test_same_key_other_body_is_a_conflict(idem: IdempotencyStore) -> None:
    other = body_hash({**BODY, "rank": 16})
    assert idem.claim(tenant="acme", scope=SCOPE, key="k1", body_hash=H) is None
    with pytest.raises(Conflict) as pending:
        idem.claim(tenant="acme", scope=SCOPE, key="k1", body_hash=other)
    assert pending.value.code == "idempotency_key_reused"
    idem.complete(tenant="acme", scope=SCOPE, key="k1", body_hash=H, value={"job_id": "job_1"})
    with pytest.raises(Conflict) as done:
        idem.claim(tenant="acme", scope=SCOPE, key="k1", body_hash=other)
    assert done.value.code == "idempotency_key_reused"
    with pytest.raises(Conflict):
        idem.lookup(tenant="acme", scope=SCOPE, key="k1", body_hash=other)
    # A late complete from a request with the other body does not overwrite the answer.
    idem.complete(tenant="acme", scope=SCOPE, key="k1", body_hash=other, value={"job_id": "x"})
    assert idem.lookup(tenant="acme", scope=SCOPE, key="k1", body_hash=H) == {"job_id": "job_1"}


def test_keys_are_per_tenant_and_scope(idem: IdempotencyStore) -> None:
    assert idem.claim(tenant="acme", scope=SCOPE, key="k", body_hash=H) is None
    assert idem.claim(tenant="globex", scope=SCOPE, key="k", body_hash=H) is None
    assert idem.claim(tenant="acme", scope="unlearning", key="k", body_hash=H) is None


def test_in_flight_request_gives_in_progress_after_waiting(redis_client: Redis) -> None:
    idem = IdempotencyStore(redis_client, wait_s=0.3)
    assert idem.claim(tenant="acme", scope=SCOPE, key="k", body_hash=H) is None
    start = time.monotonic()
    with pytest.raises(Conflict) as info:
        idem.claim(tenant="acme", scope=SCOPE, key="k", body_hash=H)
    assert info.value.code == "idempotency_in_progress"
    assert 0.3 <= time.monotonic() - start < 2.0
    assert idem.lookup(tenant="acme", scope=SCOPE, key="k", body_hash=H) is None


def test_release_lets_a_retry_in(idem: IdempotencyStore) -> None:
    assert idem.claim(tenant="acme", scope=SCOPE, key="k", body_hash=H) is None
    idem.release(tenant="acme", scope=SCOPE, key="k", body_hash=H)
    assert idem.claim(tenant="acme", scope=SCOPE, key="k", body_hash=H) is None
    idem.complete(tenant="acme", scope=SCOPE, key="k", body_hash=H, value={"job_id": "j"})
    # Releasing after completion does not forget the answer.
    idem.release(tenant="acme", scope=SCOPE, key="k", body_hash=H)
    assert idem.claim(tenant="acme", scope=SCOPE, key="k", body_hash=H) == {"job_id": "j"}


def test_abandoned_claim_expires(redis_client: Redis) -> None:
    idem = IdempotencyStore(redis_client, pending_ttl_s=1, wait_s=0.1)
    assert idem.claim(tenant="acme", scope=SCOPE, key="k", body_hash=H) is None
    time.sleep(1.2)
    assert idem.claim(tenant="acme", scope=SCOPE, key="k", body_hash=H) is None


def test_answers_are_kept_for_the_ttl(redis_client: Redis) -> None:
    idem = IdempotencyStore(redis_client, ttl_s=3600)
    idem.claim(tenant="acme", scope=SCOPE, key="k", body_hash=H)
    idem.complete(tenant="acme", scope=SCOPE, key="k", body_hash=H, value={"job_id": "j"})
    (key,) = redis_client.keys("lorafold:idem:*")
    assert 3590 <= redis_client.ttl(key) <= 3600


@pytest.mark.parametrize("key", ["", "x" * 256, "bad\nkey"])
def test_invalid_keys_are_refused(idem: IdempotencyStore, key: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        idem.claim(tenant="acme", scope=SCOPE, key=key, body_hash=H)
    assert info.value.code == "invalid_idempotency_key"


def test_concurrent_identical_posts_create_one_job(redis_client: Redis) -> None:
    """Eight identical POSTs at once: one creates the job, seven replay its id."""
    idem = IdempotencyStore(redis_client, wait_s=10.0)
    jobs = JobStore(redis_client)
    n = 8
    barrier = threading.Barrier(n)
    answers: list[Any] = [None] * n

    def post(i: int) -> None:
        barrier.wait()
        try:
            replay = idem.claim(tenant="acme", scope=SCOPE, key="same", body_hash=H)
            if replay is not None:
                answers[i] = ("replay", replay["job_id"])
                return
            time.sleep(0.2)  # the owner is slow: the others must wait, not create
            job = jobs.create(tenant="acme", type="merge", params=BODY)
            idem.complete(tenant="acme", scope=SCOPE, key="same", body_hash=H,
                          value={"job_id": job.id})
            answers[i] = ("owner", job.id)
        except Exception as e:  # collected and asserted on below
            answers[i] = ("error", repr(e))

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    kinds = [a[0] for a in answers]
    assert kinds.count("owner") == 1 and kinds.count("replay") == n - 1, answers
    assert len({a[1] for a in answers}) == 1
    assert len(jobs.list(tenant="acme").items) == 1


def test_a_claim_is_kept_alive_while_its_work_runs(redis_client: Redis) -> None:
    """Work longer than the pending TTL (an upload's validation can take 600 s against a
    120 s claim): a retry meanwhile must not run the work again."""
    import time

    from lorafold.errors import Conflict
    from lorafold.service.idempotency import idempotent

    idem = IdempotencyStore(redis_client, pending_ttl_s=1, wait_s=0.1, prefix="keepalive:")
    runs = []
    with idempotent(idem, tenant="t", scope="uploads", key="k-1", fingerprint="h") as claim:
        runs.append(1)
        time.sleep(2.5)  # 2.5 pending TTLs
        with pytest.raises(Conflict) as info:  # a retry arriving now waits, then says so
            idem.claim(tenant="t", scope="uploads", key="k-1", body_hash="h")
        assert info.value.code == "idempotency_in_progress"
        claim.value = {"id": "ad_1"}
    assert idem.claim(tenant="t", scope="uploads", key="k-1", body_hash="h") == {"id": "ad_1"}
    assert runs == [1]
    assert not idem.extend(tenant="t", scope="uploads", key="k-1", body_hash="h")  # done
