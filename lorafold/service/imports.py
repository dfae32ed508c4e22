"""Import by reference: POST /v1/adapters {"source": "https://…" | "s3://…" | "hf://…"}.

The service fetches the source into an upload spool (lorafold.fetch: the SSRF guard,
the allowed buckets, the byte limit while streaming, one deadline), then hands the spool
to the upload path (`create_adapter`): the same archive bounds, validation, refusals and
codes as an upload of the same bytes, and the adapter is recorded as an upload.

Idempotency-Key works as for uploads, on the request body: the same key and body answer
the first adapter without fetching again; the same key with another body is a 409. The
source is checked (scheme, host allow-list, bucket, Hub switch) before the key is claimed
or anything is fetched, and it is logged without its query (presigned URLs).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from lorafold.budget import Budget
from lorafold.errors import Busy, PayloadTooLarge
from lorafold.fetch import FetchPolicy, fetch_source, parse_source
from lorafold.fetch.hub import check_hub_allowed
from lorafold.fetch.sink import Writer
from lorafold.fetch.sources import HubSource, S3Source, Source, redacted
from lorafold.jobs import body_hash
from lorafold.service.context import ServiceContext
from lorafold.service.idempotency import idempotent
from lorafold.service.uploads import UploadSpool, create_adapter, replayed_view
from lorafold.settings import Settings
from lorafold.storage import Storage, resolve_storage

logger = logging.getLogger(__name__)

# Each import holds an API worker thread for up to import_timeout_s (a slow source): past
# this many at once in one API process, more are refused (429 imports_busy) rather than
# letting slow sources take every thread uploads and job routes need.
MAX_CONCURRENT_IMPORTS = 8
_import_slots = threading.BoundedSemaphore(MAX_CONCURRENT_IMPORTS)


@contextmanager
def import_slot() -> Iterator[None]:
    if not _import_slots.acquire(blocking=False):
        raise Busy(f"{MAX_CONCURRENT_IMPORTS} imports are already running on this API "
                   "process; retry shortly", code="imports_busy")
    try:
        yield
    finally:
        _import_slots.release()


def fetch_policy(settings: Settings) -> FetchPolicy:
    return FetchPolicy.from_entries(settings.import_allowed_hosts,
                                    public_https=settings.import_public_https,
                                    s3_buckets=tuple(settings.import_s3_buckets),
                                    hub=settings.import_hub,
                                    timeout_s=settings.import_timeout_s)


class SpoolSink:
    """The fetchers' `Sink` over an upload spool: the same slots a multipart upload fills."""

    def __init__(self, spool: UploadSpool) -> None:
        self.spool = spool

    def archive(self, name: str) -> Writer:
        spooled = self.spool.open_file("archive", name)
        assert spooled is not None  # an archive part is always kept
        return spooled

    def file(self, name: str) -> Writer | None:
        return self.spool.open_file("files", name)


def source_budget(limit: int) -> Budget:
    return Budget(limit, lambda n: PayloadTooLarge(
        f"the source exceeds the upload limit of {n} bytes", code="source_too_large",
        limit=n))


def precheck(source: Source, policy: FetchPolicy) -> None:
    """Refusals that need no I/O, made before the idempotency key is claimed."""
    if isinstance(source, S3Source):
        policy.check_bucket(source)
    elif isinstance(source, HubSource):
        check_hub_allowed(source, policy)


def _bucket_opener(settings: Settings) -> Callable[[str], Storage]:
    def open_bucket(bucket: str) -> Storage:
        return resolve_storage(f"s3://{bucket}", create_bucket=False,
                               **settings.storage_options())
    return open_bucket


def import_adapter(*, ctx: ServiceContext, tenant: str, source: str, name: str | None = None,
                   metadata: Mapping[str, Any] | None = None,
                   idempotency_key: str | None = None) -> dict[str, Any]:
    """Fetch `source`, validate and publish it as an upload; the adapter's public view."""
    parsed = parse_source(source)
    settings = ctx.settings
    policy = fetch_policy(settings)
    precheck(parsed, policy)
    fingerprint = body_hash({"source": source, "name": name, "metadata": dict(metadata or {})})
    with idempotent(ctx.idempotency, tenant=tenant, scope="adapters", key=idempotency_key,
                    fingerprint=fingerprint) as claim:
        if claim.replay is not None:
            return replayed_view(ctx, tenant, claim.replay)
        with import_slot():
            view = _fetch_and_create(ctx, tenant, parsed, source, policy, name, metadata)
        claim.value = view
        return view


def _fetch_and_create(ctx: ServiceContext, tenant: str, parsed: Source, source: str,
                      policy: FetchPolicy, name: str | None,
                      metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Fetch into a fresh spool, then the upload path; the spool is removed either way."""
    settings = ctx.settings
    spool = UploadSpool.create(ctx.spool_dir)
    try:
        spool.set_field("name", (name or parsed.default_name).encode("utf-8"))
        if metadata:
            spool.set_field("metadata", json.dumps(dict(metadata)).encode("utf-8"))
        started = time.perf_counter()
        budget = source_budget(settings.max_upload_bytes)
        fetch_source(parsed, policy=policy, sink=SpoolSink(spool), budget=budget,
                     deadline=policy.deadline(source), bucket=_bucket_opener(settings),
                     work_dir=spool.root)
        logger.info("import of %s for tenant %s: %d bytes in %.2fs", redacted(source),
                    tenant, budget.used, time.perf_counter() - started)
        return create_adapter(ctx=ctx, tenant=tenant, spool=spool)
    finally:
        spool.cleanup()

