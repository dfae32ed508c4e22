"""What an import `source` names: an https/http URL, an S3 object or prefix, a Hub repo.

Parsing only (no I/O): a source that cannot be fetched by any setting is refused here,
before anything is claimed or resolved. `redacted` is how a URL appears in messages and
logs: without its query and fragment, which for a presigned URL hold the credentials.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from lorafold.errors import InvalidRequest, SourceRefused
from lorafold.storage.base import validate_key

MAX_SOURCE_LENGTH = 4096
SCHEMES = ("https", "http", "s3", "hf")
HUB_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
HUB_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def _invalid(source: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"source {redacted(source)!r}: {why}", code="invalid_source")


def redacted(url: str) -> str:
    """The URL without query or fragment (a presigned URL's signature never shows)."""
    head = url.split("#", 1)[0]
    return head.split("?", 1)[0] + ("?…" if "?" in head else "")


def _stem(path: str, fallback: str) -> str:
    name = PurePosixPath(path).name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name or fallback


@dataclass(frozen=True)
class HttpSource:
    """One archive (.zip, .tar.gz, .tar) of the adapter at an http(s) URL."""

    url: str

    @property
    def default_name(self) -> str:
        return _stem(urlsplit(self.url).path, "adapter")


@dataclass(frozen=True)
class S3Source:
    """`s3://bucket/key`: one archive object; `s3://bucket/prefix/`: the PEFT files below
    the prefix (a directory)."""

    bucket: str
    key: str

    @property
    def is_directory(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    @property
    def default_name(self) -> str:
        return _stem(self.key.rstrip("/"), self.bucket)


@dataclass(frozen=True)
class HubSource:
    """`hf://org/name@revision` (revision default "main"): the PEFT files of a Hub repo."""

    repo_id: str
    revision: str

    @property
    def default_name(self) -> str:
        return self.repo_id.split("/", 1)[1]


Source = HttpSource | S3Source | HubSource


def parse_source(source: str) -> Source:
    """The source a request names, or InvalidRequest (invalid_source) / SourceRefused
    (source_scheme_unsupported) saying why not."""
    if not source or len(source) > MAX_SOURCE_LENGTH:
        raise _invalid(source[:80], f"must be 1 to {MAX_SOURCE_LENGTH} characters")
    if not source.isascii() or not source.isprintable() or any(c.isspace() for c in source):
        raise _invalid(source, "must be printable ASCII without spaces (percent-encode the "
                               "rest, punycode for host names)")
    try:
        parts = urlsplit(source)
        parts.port  # noqa: B018  (raises for a port that is not a number in range)
    except ValueError as e:
        raise _invalid(source, str(e)) from e
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise SourceRefused(f"source {redacted(source)!r}: scheme {parts.scheme or '(none)'!r} "
                            f"is not supported (use {', '.join(s + '://' for s in SCHEMES)})",
                            code="source_scheme_unsupported")
    if scheme in ("https", "http"):
        if not parts.hostname:
            raise _invalid(source, "names no host")
        if parts.username is not None or parts.password is not None:
            raise _invalid(source, "credentials in the URL are not accepted (use a "
                                   "presigned URL, or an s3:// bucket the service may read)")
        return HttpSource(source)
    if scheme == "s3":
        bucket, key = parts.netloc, parts.path.removeprefix("/")
        if not bucket or parts.query or parts.fragment:
            raise _invalid(source, "write s3://bucket/key or s3://bucket/prefix/")
        if key.rstrip("/"):
            try:
                validate_key(key.rstrip("/"))
            except InvalidRequest as e:
                raise _invalid(source, f"not a usable object key ({e.message})") from e
        return S3Source(bucket=bucket, key=key)
    repo, _, revision = (parts.netloc + parts.path).partition("@")
    revision = revision or "main"
    if not HUB_REPO.match(repo) or not HUB_REVISION.match(revision) or ".." in revision \
            or parts.query or parts.fragment:
        raise _invalid(source, "write hf://org/name or hf://org/name@revision")
    return HubSource(repo_id=repo, revision=revision)
