"""Fetching adapters named by reference (https://, s3://, hf://) into an upload spool.

`parse_source` reads what a request names; `fetch_source` streams it into a `Sink` under
the `FetchPolicy` (the SSRF guard and the allowed buckets, lorafold.fetch.policy), a byte
budget and one deadline. What arrives is then validated by the upload path, exactly as an
upload would be (lorafold.service.imports).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from lorafold.budget import Budget
from lorafold.fetch.policy import Deadline, FetchPolicy
from lorafold.fetch.sink import Sink
from lorafold.fetch.sources import HttpSource, HubSource, S3Source, Source, parse_source
from lorafold.storage.base import Storage

__all__ = ["Deadline", "FetchPolicy", "Sink", "Source", "fetch_source", "parse_source"]


def fetch_source(source: Source, *, policy: FetchPolicy, sink: Sink, budget: Budget,
                 deadline: Deadline, bucket: Callable[[str], Storage], work_dir: Path,
                 ssl_context: ssl.SSLContext | None = None) -> None:
    """Stream `source` into `sink`; `bucket` opens an allowed S3 bucket, `work_dir` holds
    the Hub client's downloads while they are poured."""
    if isinstance(source, HttpSource):
        from lorafold.fetch.http import fetch_http

        fetch_http(source, policy=policy, sink=sink, budget=budget, deadline=deadline,
                   ssl_context=ssl_context)
    elif isinstance(source, S3Source):
        from lorafold.fetch.s3 import fetch_s3

        fetch_s3(source, policy=policy, bucket=bucket, sink=sink, budget=budget,
                 deadline=deadline)
    elif isinstance(source, HubSource):
        from lorafold.fetch.hub import fetch_hub

        fetch_hub(source, policy=policy, sink=sink, budget=budget, deadline=deadline,
                  work_dir=work_dir)
