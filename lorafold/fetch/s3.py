"""Fetch an adapter from an S3 bucket the settings allow: one archive object, or the PEFT
files below a prefix (`s3://bucket/prefix/`).

The bucket is read through the service's own `Storage` interface (`S3Storage` built with
the service's S3 endpoint and credentials by the caller), so retries, timeouts and the
checksum settings are those of the storage. A missing object or a refused read is the
source's failure (422 source_fetch_failed), not the service's storage being down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from lorafold.budget import Budget
from lorafold.errors import NotFound, SourceFetchFailed, StorageError
from lorafold.fetch.policy import Deadline, FetchPolicy
from lorafold.fetch.sink import Sink, Writer, pour
from lorafold.fetch.sources import S3Source
from lorafold.storage.base import Storage

logger = logging.getLogger(__name__)

# The files of an adapter directory that are fetched (a pickled .bin only to be refused
# by the upload path, as it would be if uploaded).
DIRECTORY_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _copy(storage: Storage, uri: str, key: str, writer: Writer | None, *, budget: Budget,
          deadline: Deadline) -> None:
    try:
        with storage.open_stream(key) as stream:
            pour(stream, writer, budget=budget, deadline=deadline)
    except NotFound as e:
        hint = "" if key.endswith(DIRECTORY_FILES) else \
            " (end the URL with / for a directory of PEFT files)"
        raise SourceFetchFailed(f"{uri}: no such object{hint}") from e
    except StorageError as e:
        raise SourceFetchFailed(f"{uri}: {e.message}") from e


def fetch_s3(source: S3Source, *, policy: FetchPolicy, bucket: Callable[[str], Storage],
             sink: Sink, budget: Budget, deadline: Deadline) -> None:
    """Stream the archive or the directory's files into `sink`."""
    policy.check_bucket(source)
    uri = f"s3://{source.bucket}/{source.key}"
    try:
        storage = bucket(source.bucket)
    except StorageError as e:
        raise SourceFetchFailed(f"{uri}: {e.message}") from e
    logger.info("import: reading %s", uri)
    if not source.is_directory:
        name = source.key.rsplit("/", 1)[-1]
        _copy(storage, uri, source.key, sink.archive(name), budget=budget, deadline=deadline)
        return
    found = 0
    for name in DIRECTORY_FILES:
        key = source.key + name
        try:
            present = storage.exists(key)
        except StorageError as e:
            raise SourceFetchFailed(f"{uri}: {e.message}") from e
        if present:
            found += 1
            _copy(storage, f"s3://{source.bucket}/{key}", key, sink.file(name), budget=budget,
                  deadline=deadline)
    if not found:
        raise SourceFetchFailed(f"{uri}: no adapter_config.json or adapter_model.safetensors "
                                "below this prefix")
