"""`Idempotency-Key` for the service's POSTs, as one context manager.

    with idempotent(store, tenant=t, scope="merges", key=k, fingerprint=f) as claim:
        if claim.replay is not None:
            return claim.replay            # same key, same request: the first answer
        claim.value = create_something()
        return claim.value

Without a key it does nothing. With one, the first caller owns the key; a failure
releases it (a retry may run), success stores `claim.value` for replays, and the same key
with another fingerprint raises Conflict(idempotency_key_reused) → 409.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lorafold.jobs import IdempotencyStore


@dataclass
class Claim:
    replay: dict[str, Any] | None = None
    value: dict[str, Any] | None = None


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
        yield claim
    except BaseException:
        store.release(tenant=tenant, scope=scope, key=key, body_hash=fingerprint)
        raise
    if claim.value is None:
        store.release(tenant=tenant, scope=scope, key=key, body_hash=fingerprint)
    else:
        store.complete(tenant=tenant, scope=scope, key=key, body_hash=fingerprint,
                       value=claim.value)
