"""`Idempotency-Key` for the service's POSTs, as one context manager.

    with idempotent(store, tenant=t, scope="merges", key=k, fingerprint=f) as claim:
        if claim.replay is not None:
            return claim.replay            # same key, same request: the first answer
        claim.value = create_something()
        return claim.value

Without a key it does nothing. With one, the first caller owns the key; a failure
releases it (a retry may run), success stores `claim.value` for replays, and the same key
with another fingerprint raises Conflict(idempotency_key_reused) → 409. While the body
runs, a background thread keeps the pending claim alive (an upload's validation can take
longer than the claim's TTL), so a retry meanwhile waits or answers
`idempotency_in_progress` instead of running the work a second time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lorafold.jobs import IdempotencyStore


@dataclass
class Claim:
    replay: dict[str, Any] | None = None
    value: dict[str, Any] | None = None


logger = logging.getLogger(__name__)


@contextmanager
def _kept_alive(store: IdempotencyStore, *, tenant: str, scope: str, key: str,
                fingerprint: str) -> Iterator[None]:
    """Extend the pending claim every third of its TTL until the block ends."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(max(store.pending_ttl_s / 3, 0.05)):
            try:
                if not store.extend(tenant=tenant, scope=scope, key=key, body_hash=fingerprint):
                    return
            except Exception:  # Redis away: the claim may lapse; the work goes on
                logger.warning("could not extend idempotency claim %s", key, exc_info=True)

    thread = threading.Thread(target=renew, name=f"idempotency-{scope}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def idempotent(store: IdempotencyStore, *, tenant: str, scope: str, key: str | None,
               fingerprint: str) -> Iterator[Claim]:
    if key is None:
        yield Claim()
        return
    replay = store.claim(tenant=tenant, scope=scope, key=key, body_hash=fingerprint)
    if replay is not None:
        yield Claim(replay=replay)
        return
    claim = Claim()
    try:
        with _kept_alive(store, tenant=tenant, scope=scope, key=key, fingerprint=fingerprint):
            yield claim
    except BaseException:
        store.release(tenant=tenant, scope=scope, key=key, body_hash=fingerprint)
        raise
    if claim.value is None:
        store.release(tenant=tenant, scope=scope, key=key, body_hash=fingerprint)
    else:
        store.complete(tenant=tenant, scope=scope, key=key, body_hash=fingerprint,
                       value=claim.value)
