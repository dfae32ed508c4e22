"""Idempotency-Key for POSTs: the same key and body replay the first answer.

Flow for a handler:

    replay = idem.claim(tenant=t, scope="merges", key=k, body_hash=h)
    if replay is not None:
        return replay                      # same request seen before: same job
    try:
        value = ...create the job...
    except Exception:
        idem.release(tenant=t, scope="merges", key=k, body_hash=h)   # let a retry in
        raise
    idem.complete(tenant=t, scope="merges", key=k, body_hash=h, value=value)

`claim` takes the key with SET NX, so of two concurrent identical POSTs exactly one owns
it; the other waits briefly for the owner's `complete` and replays it, or gets
Conflict(idempotency_in_progress). A pending claim expires after `pending_ttl_s`, so an
owner that died without `release` does not block the key for a day. Reusing a key with
another body is Conflict(idempotency_key_reused). `claim` blocks for up to `wait_s`:
call it from a sync handler (thread pool), not from inside an event loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from redis import Redis

from lorafold.errors import Conflict, InvalidRequest
from lorafold.jobs import scripts

logger = logging.getLogger(__name__)

DAY_S = 24 * 3600
MAX_KEY_LENGTH = 255


def body_hash(body: Any) -> str:
    """sha256 of the canonical JSON of a request body (key order does not matter)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyStore:
    """Remembers, per tenant and endpoint, what a POST with a given key produced."""

    def __init__(self, redis: Redis, *, ttl_s: int = DAY_S, pending_ttl_s: int = 120,
                 wait_s: float = 5.0, prefix: str = "lorafold:") -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._pending_ttl_s = pending_ttl_s
        self._wait_s = wait_s
        self._prefix = prefix
        self._complete = redis.register_script(scripts.IDEMPOTENCY_COMPLETE)
        self._release = redis.register_script(scripts.IDEMPOTENCY_RELEASE)
        self._extend = redis.register_script(scripts.IDEMPOTENCY_EXTEND)

    @property
    def pending_ttl_s(self) -> int:
        return self._pending_ttl_s

    def _key(self, tenant: str, scope: str, key: str) -> str:
        if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
            raise InvalidRequest(
                f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters",
                code="invalid_idempotency_key")
        # The user's key is hashed so that any printable text makes a bounded Redis key.
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self._prefix}idem:{tenant}:{scope}:{digest}"

    def _read(self, redis_key: str) -> dict[str, Any] | None:
        raw = self._redis.get(redis_key)
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        stored: dict[str, Any] = json.loads(text)
        return stored

    @staticmethod
    def _check_body(stored: Mapping[str, Any], key: str, body_hash: str) -> None:
        if stored["body_hash"] != body_hash:
            raise Conflict(f"Idempotency-Key {key!r} was already used with a different body",
                           code="idempotency_key_reused")

    def claim(self, *, tenant: str, scope: str, key: str, body_hash: str) -> dict[str, Any] | None:
        """None: the caller owns the key and proceeds. A dict: the stored answer to replay."""
        redis_key = self._key(tenant, scope, key)
        pending = json.dumps({"state": "pending", "body_hash": body_hash})
        deadline = time.monotonic() + self._wait_s
        delay = 0.02
        while True:
            if self._redis.set(redis_key, pending, nx=True, ex=self._pending_ttl_s):
                logger.debug("idempotency key %s claimed", redis_key)
                return None
            stored = self._read(redis_key)
            if stored is None:
                continue  # expired or released between SET and GET: try to claim again
            self._check_body(stored, key, body_hash)
            if stored["state"] == "done":
                value: dict[str, Any] = stored["value"]
                return value
            if time.monotonic() >= deadline:
                raise Conflict(f"a request with Idempotency-Key {key!r} is still in progress",
                               code="idempotency_in_progress")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def complete(self, *, tenant: str, scope: str, key: str, body_hash: str,
                 value: Mapping[str, Any]) -> None:
        """Store the answer for replays for `ttl_s` (unless the key was taken by another body)."""
        redis_key = self._key(tenant, scope, key)
        done = json.dumps({"state": "done", "body_hash": body_hash, "value": dict(value)},
                          allow_nan=False)
        written = self._complete(keys=[redis_key], args=[body_hash, done, self._ttl_s])
        if not int(written):
            logger.warning("idempotency key %s: claim lost to a different body; not stored",
                           redis_key)

    def extend(self, *, tenant: str, scope: str, key: str, body_hash: str) -> bool:
        """Push our pending claim's expiry `pending_ttl_s` ahead (work still running);
        False when it is no longer ours to extend."""
        return bool(int(self._extend(keys=[self._key(tenant, scope, key)],
                                     args=[body_hash, self._pending_ttl_s])))

    def release(self, *, tenant: str, scope: str, key: str, body_hash: str) -> None:
        """Drop our pending claim after a failure so that a retry may run."""
        self._release(keys=[self._key(tenant, scope, key)], args=[body_hash])

    def lookup(self, *, tenant: str, scope: str, key: str,
               body_hash: str) -> dict[str, Any] | None:
        """The stored answer without claiming: None when unknown or still in flight."""
        stored = self._read(self._key(tenant, scope, key))
        if stored is None:
            return None
        self._check_body(stored, key, body_hash)
        if stored["state"] != "done":
            return None
        value: dict[str, Any] = stored["value"]
        return value
