"""Object storage in an S3 bucket (AWS S3, SeaweedFS, any S3-compatible server).

Large objects go up as multipart uploads of `part_size` bytes, so at most one part is
held in memory; a failure aborts the upload, leaving neither an object nor an open
upload behind. boto3 ≥ 1.36 adds CRC checksums by default that some S3-compatible
servers reject, so checksums are only computed/validated where the API requires them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from lorafold.errors import StorageError
from lorafold.storage.base import (
    DEFAULT_CHUNK_SIZE,
    ByteStream,
    HashingCounter,
    PutResult,
    object_not_found,
    validate_key,
    validate_prefix,
)

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MIB
MIN_PART_SIZE = 5 * MIB  # S3's minimum for every part but the last
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 limit
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_NO_BUCKET_CODES = frozenset({"NoSuchBucket", "NotFound", "404"})


class S3Storage:
    """`Storage` over one S3 bucket, optionally below a key prefix (`s3://bucket/prefix`)."""

    def __init__(self, bucket: str, *, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, path_style: bool = True,
                 create_bucket: bool = True, part_size: int = DEFAULT_PART_SIZE,
                 connect_timeout: float = 5.0, read_timeout: float = 60.0,
                 max_attempts: int = 3) -> None:
        if not bucket:
            raise ValueError("bucket name is empty")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = f"{validate_key(prefix)}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.region = region
        self.part_size = part_size
        config = Config(
            s3={"addressing_style": "path" if path_style else "auto"},
            signature_version="s3v4",
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        session = boto3.session.Session(aws_access_key_id=access_key,
                                        aws_secret_access_key=secret_key, region_name=region)
        self._client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)
        if create_bucket:
            self.ensure_bucket()
            self.ensure_lifecycle()

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Storage('s3://{self.bucket}/{self.prefix}'{where})"

    # -- bucket --------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (idempotent, safe to race)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if _error_code(e) not in _NO_BUCKET_CODES:
                raise self._error("check bucket", "", e) from e
        except BotoCoreError as e:
            raise self._error("check bucket", "", e) from e
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
            logger.info("created bucket %s", self.bucket)
        except ClientError as e:
            if _error_code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._error("create bucket", "", e) from e
        except BotoCoreError as e:
            raise self._error("create bucket", "", e) from e

    def ensure_lifecycle(self, *, expire_days: int = 1) -> bool:
        """Have the server itself expire what failed publishes leave below `tmp/` and abort
        multipart uploads left open, after `expire_days`; other rules of the bucket are
        kept. False (logged) where the server has no lifecycle support: the storage sweep
        (`references.BlobReferences.sweep`) collects them instead."""
        rule_id = f"lorafold-tmp-{self.prefix.strip('/') or 'root'}"[:255]
        rule = {"ID": rule_id, "Filter": {"Prefix": f"{self.prefix}tmp/"}, "Status": "Enabled",
                "Expiration": {"Days": expire_days},
                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": expire_days}}
        try:
            try:
                rules = self._client.get_bucket_lifecycle_configuration(
                    Bucket=self.bucket).get("Rules", [])
            except ClientError as e:
                if _error_code(e) != "NoSuchLifecycleConfiguration":
                    raise
                rules = []
            rules = [r for r in rules if r.get("ID") != rule_id] + [rule]
            self._client.put_bucket_lifecycle_configuration(
                Bucket=self.bucket, LifecycleConfiguration={"Rules": rules})
        except (BotoCoreError, ClientError) as e:
            logger.warning("s3://%s has no lifecycle rule for tmp/ (%s); the storage sweep "
                           "collects unfinished uploads instead", self.bucket, e)
            return False
        return True

    def ping(self) -> None:
        self._call("reach bucket", "", self._client.head_bucket, Bucket=self.bucket)

    # -- objects -------------------------------------------------------------------------

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        full = self._key(key)
        counter = HashingCounter()
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            for chunk in chunks:  # the caller's errors pass through unchanged
                counter.update(chunk)
                buffer += chunk
                while len(buffer) >= self.part_size:
                    if upload_id is None:
                        upload_id = self._call("start upload of", key,
                                               self._client.create_multipart_upload,
                                               Bucket=self.bucket, Key=full)["UploadId"]
                    part = bytes(buffer[:self.part_size])
                    del buffer[:self.part_size]
                    parts.append(self._upload_part(key, upload_id, len(parts) + 1, part))
            if upload_id is None:
                self._call("write", key, self._client.put_object,
                           Bucket=self.bucket, Key=full, Body=bytes(buffer))
            else:
                if buffer:
                    parts.append(self._upload_part(key, upload_id, len(parts) + 1,
                                                   bytes(buffer)))
                self._call("complete upload of", key, self._client.complete_multipart_upload,
                           Bucket=self.bucket, Key=full, UploadId=upload_id,
                           MultipartUpload={"Parts": parts})
        except BaseException:
            if upload_id is not None:
                self._abort(full, upload_id)
            raise
        return counter.result()

    def _upload_part(self, key: str, upload_id: str, number: int,
                     data: bytes) -> dict[str, Any]:
        response = self._call("upload part of", key, self._client.upload_part,
                              Bucket=self.bucket, Key=self._key(key), UploadId=upload_id,
                              PartNumber=number, Body=data)
        return {"PartNumber": number, "ETag": response["ETag"]}

    def _abort(self, full_key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full_key,
                                                UploadId=upload_id)
        except (BotoCoreError, ClientError):
            # The original error matters more; a bucket lifecycle rule is the backstop.
            logger.warning("could not abort multipart upload %s of %s", upload_id, full_key,
                           exc_info=True)

    def put_bytes(self, key: str, data: bytes) -> PutResult:
        return self.put_stream(key, [data])

    def open_stream(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ByteStream:
        response = self._call("read", key, self._client.get_object,
                              Bucket=self.bucket, Key=self._key(key))
        return ByteStream(response["Body"], key=key, chunk_size=chunk_size,
                          errors=(BotoCoreError, OSError))

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.open_stream(key))

    def exists(self, key: str) -> bool:
        full = self._key(key)
        try:
            self._client.head_object(Bucket=self.bucket, Key=full)
        except ClientError as e:
            if _error_code(e) in _MISSING_CODES:
                return False
            raise self._error("check", key, e) from e
        except BotoCoreError as e:
            raise self._error("check", key, e) from e
        return True

    def delete(self, key: str) -> None:
        self._call("delete", key, self._client.delete_object,
                   Bucket=self.bucket, Key=self._key(key))

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        return self._iter_keys(prefix)

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    yield item["Key"][len(self.prefix):]
        except (BotoCoreError, ClientError) as e:
            raise self._error("list", prefix, e) from e

    def copy(self, src: str, dst: str) -> None:
        """Server-side copy (single request: objects up to 5 GB)."""
        self._call("copy", src, self._client.copy_object, Bucket=self.bucket,
                   Key=self._key(dst), CopySource={"Bucket": self.bucket, "Key": self._key(src)})

    def move(self, src: str, dst: str) -> None:
        self.copy(src, dst)
        self.delete(src)

    def presigned_url(self, key: str, expires_s: int = 3600, *,
                      filename: str | None = None) -> str | None:
        if not 1 <= expires_s <= MAX_PRESIGN_S:
            raise ValueError(f"expires_s must be between 1 and {MAX_PRESIGN_S}")
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if filename:
            safe = "".join(c for c in filename if c.isprintable() and c not in '"\\/')
            params["ResponseContentDisposition"] = f'attachment; filename="{safe}"'
        url: str = self._call("sign", key, self._client.generate_presigned_url,
                              "get_object", Params=params, ExpiresIn=expires_s)
        return url

    # -- helpers -------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _call(self, op: str, key: str, fn: Callable[..., Any], *args: Any,
              **kwargs: Any) -> Any:
        """Run one client call; NotFound for a missing key, StorageError otherwise."""
        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            if key and _error_code(e) in _MISSING_CODES:
                raise object_not_found(key) from e
            raise self._error(op, key, e) from e
        except BotoCoreError as e:
            raise self._error(op, key, e) from e

    def _error(self, op: str, key: str, e: Exception) -> StorageError:
        what = f"object {key!r}" if key else "bucket"
        return StorageError(f"S3 could not {op} {what} in s3://{self.bucket}: {e}",
                            bucket=self.bucket, key=key)


def _error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
