"""Locks named by a string (a blob digest, an adapter id), held across processes.

Reference counting a shared blob is check-then-act: "no manifest names it any more, so
delete it" races with an upload of the same bytes that is about to name it again. Every
such step runs under the lock of the name it touches. `RedisLocks` serialises the API and
every worker (a lease bounds how long a crashed holder blocks the others); `LocalLocks`
serves one process (the CLI, tests without Redis).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import Protocol

from redis import Redis
from redis.exceptions import LockError

from lorafold.errors import StorageError

LEASE_S = 600.0   # a holder that died frees its lock after this long
WAIT_S = 60.0     # a caller gives up (503, retryable) after waiting this long


class Locks(Protocol):
    def hold(self, names: Iterable[str]) -> contextlib.AbstractContextManager[None]:
        """Hold the locks of all `names` (taken in sorted order: no deadlock)."""
        ...


class LocalLocks:
    """Locks within one process."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    @contextlib.contextmanager
    def hold(self, names: Iterable[str]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for name in sorted(set(names)):
                lock = self._lock(name)
                if not lock.acquire(timeout=WAIT_S):
                    raise _busy(name)
                stack.callback(lock.release)
            yield


class RedisLocks:
    """Locks shared by every process on one Redis (`<prefix>lock:<name>`)."""

    def __init__(self, redis: Redis, *, prefix: str = "lorafold:", lease_s: float = LEASE_S,
                 wait_s: float = WAIT_S) -> None:
        self._redis = redis
        self._prefix = prefix
        self._lease_s = lease_s
        self._wait_s = wait_s

    @contextlib.contextmanager
    def hold(self, names: Iterable[str]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for name in sorted(set(names)):
                lock = self._redis.lock(f"{self._prefix}lock:{name}", timeout=self._lease_s,
                                        blocking_timeout=self._wait_s)
                if not lock.acquire():
                    raise _busy(name)
                stack.callback(_release, lock)
            yield


def _release(lock: object) -> None:
    with contextlib.suppress(LockError):  # the lease ran out: someone else may hold it now
        lock.release()  # type: ignore[attr-defined]


def _busy(name: str) -> StorageError:
    return StorageError(f"{name} is busy (another request holds its lock); try again",
                        code="storage_busy")
