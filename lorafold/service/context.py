"""The backends one process talks to, built once from `Settings` and shared.

The API builds one `ServiceContext` at start-up; a worker builds one before it forks its
job processes. Redis connections are fork-aware (redis-py resets its pool in a child), but
boto3 clients are not, so the storage is created lazily per process id: a forked job
never reuses a socket its parent opened.
"""

from __future__ import annotations

import os
import tempfile
from functools import cached_property
from pathlib import Path

from redis import BlockingConnectionPool, Redis

from lorafold.jobs import IdempotencyStore, JobStore
from lorafold.service.quotas import ActiveJobs
from lorafold.service.validation import InProcessValidator, Validator
from lorafold.settings import Settings
from lorafold.storage import Storage, resolve_storage
from lorafold.storage.adapters import AdapterStore
from lorafold.storage.datasets import DatasetStore
from lorafold.storage.locks import Locks, RedisLocks

REDIS_SOCKET_TIMEOUT_S = 5.0


def connect_redis(settings: Settings) -> Redis:
    """A client with a bounded, blocking pool: a burst waits for a connection, not fails."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.redis_max_connections, timeout=10,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S, socket_connect_timeout=2.0,
        health_check_interval=30)
    return Redis(connection_pool=pool)


class ServiceContext:
    """Settings plus Redis, the job and idempotency stores, storage and the adapter and data
    set stores."""

    def __init__(self, settings: Settings, *, redis: Redis | None = None,
                 storage: Storage | None = None, validator: Validator | None = None) -> None:
        self.settings = settings
        self.validator: Validator = validator if validator is not None else InProcessValidator()
        self.redis = redis if redis is not None else connect_redis(settings)
        self.jobs = JobStore(self.redis, retention_s=settings.job_retention_s)
        self.idempotency = IdempotencyStore(self.redis, ttl_s=settings.idempotency_ttl_s)
        self.active_jobs = ActiveJobs(self.redis)
        # One lock per blob digest and per stored item, shared by the API and the workers.
        self.locks: Locks = RedisLocks(self.redis)
        self._storage = storage
        # The process the storage client belongs to; None: built unused for forking.
        self._storage_pid: int | None = os.getpid()

    @property
    def storage(self) -> Storage:
        owner = self._storage_pid
        if self._storage is None or (owner is not None and owner != os.getpid()):
            self._storage = resolve_storage(self.settings.storage_url,
                                            **self.settings.storage_options())
            self._storage_pid = os.getpid()
        return self._storage

    def prepare_for_fork(self) -> None:
        """Build the storage client once, without network I/O, in a process that forks job
        processes and never uses storage itself: each child inherits a client whose
        connection pool is empty, and saves building one (a few hundred ms for boto3)."""
        self._storage = resolve_storage(self.settings.storage_url, create_bucket=False,
                                        **self.settings.storage_options())
        self._storage_pid = None

    @property
    def adapters(self) -> AdapterStore:
        return AdapterStore(self.storage, self.locks)

    @property
    def datasets(self) -> DatasetStore:
        return DatasetStore(self.storage, self.locks)

    @cached_property
    def presign_storage(self) -> Storage:
        """The storage as clients see it, for presigned URLs (signing does no I/O)."""
        options = self.settings.presign_options()
        if options is None:
            return self.storage
        return resolve_storage(self.settings.storage_url, **options)

    @cached_property
    def spool_dir(self) -> Path:
        """Where uploads and jobs keep their temporary files (created on first use)."""
        root = self.settings.spool_dir or Path(tempfile.gettempdir()) / "lorafold-spool"
        root.mkdir(parents=True, exist_ok=True)
        return root

    def close(self) -> None:
        self.validator.close()
        self.redis.close()
        self.redis.connection_pool.disconnect()
